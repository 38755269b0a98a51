// Command stasis takes application-consistent, incremental snapshots of block devices.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"runtime/debug"
	"runtime/pprof"
	"runtime/trace"
	"syscall"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	if os.Getenv("GOMEMLIMIT") == "" {
		// Snapshots of any size need tens of MB; a soft limit keeps the garbage collector
		// from letting the heap balloon when the machine is busy and it runs late.
		debug.SetMemoryLimit(192 << 20)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if path := os.Getenv("STASIS_CPUPROFILE"); path != "" { // for developers: go tool pprof
		if f, err := os.Create(path); err == nil {
			pprof.StartCPUProfile(f)
			defer pprof.StopCPUProfile()
		}
	}
	if path := os.Getenv("STASIS_TRACE"); path != "" { // for developers: go tool trace
		if f, err := os.Create(path); err == nil {
			trace.Start(f)
			defer trace.Stop()
		}
	}
	err := newRootCmd().ExecuteContext(ctx)
	trace.Stop()
	pprof.StopCPUProfile()
	if err != nil {
		fmt.Fprintf(os.Stderr, "stasis: %v\n", err)
		var ee exitError
		if errors.As(err, &ee) {
			os.Exit(ee.code)
		}
		os.Exit(1)
	}
}

// exitError carries a specific exit status (verify's "problems found", for example).
type exitError struct {
	code int
	err  error
}

func (e exitError) Error() string { return e.err.Error() }
func (e exitError) Unwrap() error { return e.err }
