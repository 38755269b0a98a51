//go:build !race

package hugemem

const raceEnabled = false
