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
	"strings"
	"syscall"
	"time"

	"github.com/stasis-project/stasis/chain"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	if os.Getenv("GOMEMLIMIT") == "" {
		// Snapshots of any size need tens of MB; a soft limit keeps the garbage collector
		// from letting the heap balloon when the machine is busy and it runs late.
		debug.SetMemoryLimit(192 << 20)
	}
	testSeams()
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
		os.Exit(exitCode(ctx, err))
	}
}

// Exit statuses, listed in `stasis --help` and docs/CLI.md. 2 is left to Go's panics.
const (
	exitFailure      = 1   // any other failure
	exitDamage       = 3   // verify found damage; doctor found errors
	exitWarnings     = 4   // doctor found warnings only
	exitNoRepository = 10  // the repository does not exist
	exitLocked       = 11  // another process holds the repository's deletion lock
	exitPassword     = 12  // no passphrase, or a wrong one
	exitInterrupted  = 130 // Ctrl-C or SIGTERM
)

const exitCodesHelp = `Exit status: 0 ok; 1 error; 3 damage found (verify) or errors found (doctor);
10 no repository at the location; 11 repository locked by another process;
12 passphrase missing or wrong; 130 interrupted (Ctrl-C, SIGTERM).`

// exitCode picks err's exit status.
func exitCode(ctx context.Context, err error) int {
	var ee exitError
	switch {
	case errors.As(err, &ee):
		return ee.code
	case ctx.Err() != nil || errors.Is(err, context.Canceled):
		return exitInterrupted
	}
	return exitFailure
}

// exitError carries a specific exit status (verify's "problems found", for example).
type exitError struct {
	code int
	err  error
}

func (e exitError) Error() string { return e.err.Error() }
func (e exitError) Unwrap() error { return e.err }

// testSeams shortens the repository's lease times for the test suite only:
// STASIS_TEST_LEASE="REFRESH,STALE" (durations).
func testSeams() {
	if v := os.Getenv("STASIS_TEST_LEASE"); v != "" {
		r, s, _ := strings.Cut(v, ",")
		refresh, err1 := time.ParseDuration(r)
		stale, err2 := time.ParseDuration(s)
		if err1 == nil && err2 == nil && refresh > 0 && stale > 2*refresh {
			chain.LeaseRefresh, chain.LeaseStale = refresh, stale
		}
	}
}
