//go:build race

package hugemem

// raceEnabled: the race detector's shadow memory faults in alongside the memory it shadows.
const raceEnabled = true
