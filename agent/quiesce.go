package agent

import (
	"context"
	"fmt"

	"github.com/stasis-project/stasis/agent/hooks"
	"github.com/stasis-project/stasis/agent/mysql"
)

// appState is what quiescing recorded for the manifest.
type appState struct {
	quiesced bool // hooks and lock (if any) all succeeded in the committed attempt
	info     *mysql.Info
	lockErr  string
}

func (a *appState) record() map[string]any {
	if a.info == nil && a.lockErr == "" {
		return nil
	}
	m := map[string]any{}
	if a.info != nil {
		m = a.info.Map()
	}
	if a.lockErr != "" {
		m["lock_error"] = a.lockErr
	}
	return m
}

// quiescer runs, around each frozen final round: pre hooks, then the database lock and
// binlog coordinates; and after the thaw: unlock, then post hooks (also after failures).
// name is the volume's or the group's.
func (v *Volume) quiescer(spec *AppSpec, name string, app *appState, warn func(string, ...any)) func(ctx context.Context) (func(), error) {
	env := []string{"STASIS_VOLUME=" + name, "STASIS_SOURCE=" + v.spec.Source}
	post := func() {
		if len(spec.PostHooks) == 0 {
			return
		}
		if err := hooks.Run(context.Background(), "post", spec.PostHooks, spec.HookTimeout, env, v.opts.Log); err != nil {
			warn("%v", err)
		}
	}
	return func(ctx context.Context) (func(), error) {
		*app = appState{}
		if err := hooks.Run(ctx, "pre", spec.PreHooks, spec.HookTimeout, env, v.opts.Log); err != nil {
			post()
			return nil, fmt.Errorf("%w; nothing was locked or frozen", err)
		}
		var locked *mysql.Locked
		if spec.MySQL != nil && spec.MySQL.Mode != "none" {
			cfg := *spec.MySQL
			dsn, err := mysql.ReadDSN(spec.DSNFile)
			if err == nil {
				cfg.DSN = dsn
				locked, err = mysql.Lock(ctx, cfg)
			}
			if err != nil {
				if !spec.CrashConsistentOnFailure {
					post()
					return nil, fmt.Errorf("database lock: %w", err)
				}
				warn("database lock failed, snapshot taken without it (on_failure: crash-consistent): %v", err)
				app.lockErr = err.Error()
			}
		}
		return func() {
			if locked != nil {
				info, err := locked.Release()
				app.info = &info
				if err != nil {
					warn("%v", err)
				}
			}
			app.quiesced = app.lockErr == ""
			post()
		}, nil
	}
}
