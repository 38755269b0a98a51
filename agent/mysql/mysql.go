// Package mysql quiesces a MySQL or MariaDB server for a block-level snapshot: it takes
// FLUSH TABLES WITH READ LOCK (or MariaDB's BACKUP STAGE BLOCK_COMMIT) on one dedicated
// connection, bounded so writers never wait longer than the lock timeout, records the binary
// log coordinates, and releases the lock. Every release path is independent: an abandoned
// lock attempt is KILLed from a second connection, and if this process dies the server ends
// the session (socket closed, or wait_timeout for a hung process) and with it the lock.
package mysql

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/go-sql-driver/mysql"

	"github.com/stasis-project/stasis/agent/trust"
)

// Config is a validated database section of a volume.
type Config struct {
	DSN                string        // go-sql-driver DSN, e.g. stasis:pw@unix(/run/mysqld/mysqld.sock)/
	Mode               string        // auto | ftwrl | backup-stage | none
	LockTimeout        time.Duration // give up on the lock after this
	LongQueryThreshold time.Duration // wait (up to LockTimeout) while longer queries run; 0: don't
	KillLongQueries    bool          // KILL those queries instead of giving up
	MaxHold            time.Duration // upper bound on holding the lock: the session's wait_timeout
}

// Info is what a snapshot's manifest records.
type Info struct {
	Flavour    string  `json:"flavour"` // MariaDB or MySQL
	Version    string  `json:"version"`
	Mode       string  `json:"lock_mode"`
	BinlogFile string  `json:"binlog_file,omitempty"`
	BinlogPos  uint64  `json:"binlog_position,omitempty"`
	GTID       string  `json:"gtid,omitempty"`
	LockWaitMS float64 `json:"lock_wait_ms"`
	LockHoldMS float64 `json:"lock_hold_ms"`
}

// Map returns the info as the manifest's app map.
func (i Info) Map() map[string]any {
	m := map[string]any{"database": i.Flavour, "version": i.Version, "lock_mode": i.Mode,
		"lock_wait_ms": i.LockWaitMS, "lock_hold_ms": i.LockHoldMS}
	if i.BinlogFile != "" {
		m["binlog_file"], m["binlog_position"] = i.BinlogFile, i.BinlogPos
	}
	if i.GTID != "" {
		m["gtid"] = i.GTID
	}
	return m
}

// Sentinel errors.
var (
	ErrConnect   = errors.New("cannot connect to the database")
	ErrLockWait  = errors.New("database lock not obtained in time")
	ErrPrivilege = errors.New("database account lacks a privilege")
)

// ReadDSN reads a DSN file, which holds a password: it must belong to root, be readable by
// nobody else, and sit where nobody else can replace it.
func ReadDSN(path string) (string, error) {
	if err := trust.Check(path, true); err != nil {
		return "", fmt.Errorf("dsn_file %s: %w", path, err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	dsn := strings.TrimSpace(string(b))
	if _, err := mysql.ParseDSN(dsn); err != nil {
		return "", fmt.Errorf("dsn_file %s: %v; write it like stasis:PASSWORD@unix(/run/mysqld/mysqld.sock)/", path, err)
	}
	return dsn, nil
}

// open connects with short timeouts and says clearly why it could not.
func open(ctx context.Context, dsn string) (*sql.DB, *sql.Conn, error) {
	cfg, err := mysql.ParseDSN(dsn)
	if err != nil {
		return nil, nil, err
	}
	cfg.Timeout = 5 * time.Second
	if cfg.Params == nil {
		cfg.Params = map[string]string{}
	}
	db, err := sql.Open("mysql", cfg.FormatDSN())
	if err != nil {
		return nil, nil, err
	}
	db.SetMaxOpenConns(3)
	conn, err := db.Conn(ctx)
	if err == nil {
		err = conn.PingContext(ctx)
	}
	if err != nil {
		db.Close()
		return nil, nil, explain(cfg, err)
	}
	return db, conn, nil
}

func explain(cfg *mysql.Config, err error) error {
	where := cfg.Addr
	if cfg.Net == "unix" {
		where = "socket " + cfg.Addr
	}
	var me *mysql.MySQLError
	var ne *net.OpError
	switch {
	case errors.As(err, &me) && me.Number == 1045:
		return fmt.Errorf("%w at %s: access denied for user %q: check the user and password in the dsn_file", ErrConnect, where, cfg.User)
	case errors.As(err, &ne) && errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("%w: %s does not exist: is the server running, and is the socket path in the dsn_file right?", ErrConnect, where)
	case errors.As(err, &ne):
		return fmt.Errorf("%w at %s: %v: is the server running?", ErrConnect, where, ne.Err)
	}
	return fmt.Errorf("%w at %s: %v", ErrConnect, where, err)
}

// Locked is a held lock. Release must be called exactly once.
type Locked struct {
	db     *sql.DB
	conn   *sql.Conn
	info   Info
	mode   string
	taken  time.Time
	closed bool
}

// Lock takes the database lock as configured. The caller freezes and reads, then Releases.
func Lock(ctx context.Context, cfg Config) (*Locked, error) {
	db, conn, err := open(ctx, cfg.DSN)
	if err != nil {
		return nil, err
	}
	l := &Locked{db: db, conn: conn}
	fail := func(err error) (*Locked, error) {
		conn.Close()
		db.Close()
		return nil, err
	}
	var version, comment string
	if err := conn.QueryRowContext(ctx, "SELECT VERSION(), @@version_comment").Scan(&version, &comment); err != nil {
		return fail(fmt.Errorf("read server version: %w", err))
	}
	l.info.Version = version
	l.info.Flavour = "MySQL"
	if strings.Contains(strings.ToLower(version+comment), "mariadb") {
		l.info.Flavour = "MariaDB"
	}
	l.mode = cfg.Mode
	if l.mode == "" || l.mode == "auto" {
		l.mode = "ftwrl"
		if l.info.Flavour == "MariaDB" && versionAtLeast(version, 10, 4) {
			l.mode = "backup-stage"
		}
	}
	if l.mode == "backup-stage" && l.info.Flavour != "MariaDB" {
		return fail(fmt.Errorf("mode backup-stage needs MariaDB 10.4 or later; this is %s %s: use mode ftwrl or auto", l.info.Flavour, version))
	}
	l.info.Mode = l.mode
	// Dead-man switch: a hung stasis holding the lock loses its session after MaxHold.
	hold := int(math.Ceil(max(cfg.MaxHold, 10*time.Second).Seconds()))
	lockWait := int(math.Ceil(max(cfg.LockTimeout, time.Second).Seconds()))
	if _, err := conn.ExecContext(ctx, fmt.Sprintf("SET SESSION wait_timeout = %d, SESSION lock_wait_timeout = %d", hold, lockWait)); err != nil {
		return fail(fmt.Errorf("set session timeouts: %w", err))
	}
	start := time.Now()
	deadline := start.Add(cfg.LockTimeout)
	if cfg.LongQueryThreshold > 0 {
		if err := l.waitLongQueries(ctx, cfg, deadline); err != nil {
			return fail(err)
		}
	}
	if err := l.acquire(ctx, deadline, cfg.LockTimeout); err != nil {
		return fail(err)
	}
	l.taken = time.Now()
	l.info.LockWaitMS = ms(l.taken.Sub(start))
	if err := l.readCoordinates(ctx); err != nil {
		l.Release()
		return nil, err
	}
	return l, nil
}

// Info returns what was recorded; LockHoldMS is set by Release.
func (l *Locked) Info() Info { return l.info }

type longQuery struct {
	id   int64
	user string
	secs int64
}

// String names a query by its session, user and age; its text (other people's data) is
// never reported or kept.
func (q longQuery) String() string {
	return fmt.Sprintf("session %d of user %s, running a statement for %ds", q.id, q.user, q.secs)
}

// listLongQueries returns the queries other sessions have been running for at least
// threshold (replication threads and idle sessions excluded).
func listLongQueries(ctx context.Context, conn *sql.Conn, threshold time.Duration) ([]longQuery, error) {
	rows, err := conn.QueryContext(ctx, `SELECT ID, USER, TIME FROM information_schema.PROCESSLIST
		WHERE COMMAND NOT IN ('Sleep', 'Daemon', 'Binlog Dump', 'Binlog Dump GTID') AND INFO IS NOT NULL
		AND ID <> CONNECTION_ID() AND TIME >= ?`,
		int64(threshold.Seconds()))
	if err != nil {
		return nil, fmt.Errorf("read the process list: %w", err)
	}
	defer rows.Close()
	var out []longQuery
	for rows.Next() {
		var q longQuery
		if rows.Scan(&q.id, &q.user, &q.secs) == nil {
			out = append(out, q)
		}
	}
	return out, rows.Err()
}

// waitLongQueries waits while queries older than the threshold run, which would make FTWRL
// wait and with it every writer; it KILLs them instead when configured.
func (l *Locked) waitLongQueries(ctx context.Context, cfg Config, deadline time.Time) error {
	for {
		long, err := listLongQueries(ctx, l.conn, cfg.LongQueryThreshold)
		if err != nil {
			return err
		}
		if len(long) == 0 {
			return nil
		}
		if cfg.KillLongQueries {
			for _, q := range long {
				if _, err := l.conn.ExecContext(ctx, fmt.Sprintf("KILL QUERY %d", q.id)); err != nil {
					return fmt.Errorf("%w: KILL QUERY %d (%s): %v", ErrPrivilege, q.id, q, err)
				}
			}
			continue
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%w: a long-running query would block the lock (and every writer behind it): %s; "+
				"wait for it, raise long_query_threshold, or set kill_long_queries: true", ErrLockWait, long[0])
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// acquire runs the lock statements, abandoning them at the deadline: the waiting statement
// is KILLed from a second connection so it does not stay queued with writers behind it.
func (l *Locked) acquire(ctx context.Context, deadline time.Time, timeout time.Duration) error {
	var id int64
	if err := l.conn.QueryRowContext(ctx, "SELECT CONNECTION_ID()").Scan(&id); err != nil {
		return err
	}
	stmts := []string{"FLUSH TABLES WITH READ LOCK"}
	if l.mode == "backup-stage" {
		stmts = []string{"BACKUP STAGE START", "BACKUP STAGE BLOCK_COMMIT"}
	}
	done := make(chan error, 1)
	go func() {
		for _, s := range stmts {
			if _, err := l.conn.ExecContext(context.Background(), s); err != nil {
				done <- fmt.Errorf("%s: %w", s, err)
				return
			}
		}
		done <- nil
	}()
	wait := time.Until(deadline)
	select {
	case err := <-done:
		var me *mysql.MySQLError
		if errors.As(err, &me) && (me.Number == 1227 || me.Number == 1044) {
			return fmt.Errorf("%w: %v: GRANT RELOAD ON *.* TO the stasis account", ErrPrivilege, err)
		}
		if errors.As(err, &me) && me.Number == 1205 {
			// The server's lock_wait_timeout ended the wait first: the same failure.
			return fmt.Errorf("%w: %s did not get the lock within lock_timeout (%s); what was running: %s",
				ErrLockWait, strings.Join(stmts, "; "), timeout, l.blockers(id))
		}
		return err
	case <-time.After(wait):
	case <-ctx.Done():
	}
	blockers := l.blockers(id)
	// Abandon the attempt: KILL it from a second connection, so the server drops the queued
	// lock request (cancelling our socket alone would not).
	if c2, err := l.db.Conn(context.Background()); err == nil {
		c2.ExecContext(context.Background(), fmt.Sprintf("KILL %d", id))
		c2.Close()
	}
	<-done
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return fmt.Errorf("%w: %s did not get the lock within lock_timeout (%s); what was running: %s",
		ErrLockWait, strings.Join(stmts, "; "), timeout, blockers)
}

// blockers describes what runs on the server while our lock waits, for the error message.
func (l *Locked) blockers(self int64) string {
	c2, err := l.db.Conn(context.Background())
	if err != nil {
		return "unknown (" + err.Error() + ")"
	}
	defer c2.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	rows, err := c2.QueryContext(ctx, `SELECT ID, USER, TIME FROM information_schema.PROCESSLIST
		WHERE COMMAND NOT IN ('Sleep', 'Daemon') AND INFO IS NOT NULL AND ID <> ? AND ID <> CONNECTION_ID()
		ORDER BY TIME DESC LIMIT 3`, self)
	if err != nil {
		return "unknown (" + err.Error() + ")"
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var q longQuery
		if rows.Scan(&q.id, &q.user, &q.secs) == nil {
			out = append(out, q.String())
		}
	}
	if len(out) == 0 {
		return "nothing visible (grant PROCESS to see other users' queries)"
	}
	return strings.Join(out, "; ")
}

// readCoordinates records the binary log position and GTID state under the lock.
func (l *Locked) readCoordinates(ctx context.Context) error {
	stmt := "SHOW MASTER STATUS"
	if l.info.Flavour == "MySQL" && versionAtLeast(l.info.Version, 8, 2) {
		stmt = "SHOW BINARY LOG STATUS" // SHOW MASTER STATUS is gone in 8.4
	}
	rows, err := l.conn.QueryContext(ctx, stmt)
	if err != nil {
		var me *mysql.MySQLError
		if errors.As(err, &me) && (me.Number == 1227 || me.Number == 1044) {
			grant := "REPLICATION CLIENT"
			if l.info.Flavour == "MariaDB" && versionAtLeast(l.info.Version, 10, 5) {
				grant = "BINLOG MONITOR"
			}
			return fmt.Errorf("%w: %s: %v: GRANT %s ON *.* TO the stasis account", ErrPrivilege, stmt, err, grant)
		}
		return fmt.Errorf("%s: %w", stmt, err)
	}
	if rows.Next() {
		cols, _ := rows.Columns()
		vals := make([]sql.RawBytes, len(cols))
		ptrs := make([]any, len(cols))
		for i := range vals {
			ptrs[i] = &vals[i]
		}
		if err := rows.Scan(ptrs...); err == nil {
			for i, c := range cols {
				switch c {
				case "File":
					l.info.BinlogFile = string(vals[i])
				case "Position":
					l.info.BinlogPos, _ = strconv.ParseUint(string(vals[i]), 10, 64)
				case "Executed_Gtid_Set":
					l.info.GTID = string(vals[i])
				}
			}
		}
	}
	rows.Close()
	if l.info.Flavour == "MariaDB" {
		var gtid sql.NullString
		if err := l.conn.QueryRowContext(ctx, "SELECT @@global.gtid_binlog_pos").Scan(&gtid); err == nil {
			l.info.GTID = gtid.String
		}
	}
	return nil
}

// Release unlocks and ends the session; the hold time goes into Info.
func (l *Locked) Release() (Info, error) {
	if l.closed {
		return l.info, nil
	}
	l.closed = true
	stmt := "UNLOCK TABLES"
	if l.mode == "backup-stage" {
		stmt = "BACKUP STAGE END"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := l.conn.ExecContext(ctx, stmt)
	l.info.LockHoldMS = ms(time.Since(l.taken))
	l.conn.Close() // ending the session releases the lock even if the statement failed
	l.db.Close()
	if err != nil {
		return l.info, fmt.Errorf("%s: %w (the session was closed, which releases the lock)", stmt, err)
	}
	return l.info, nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// versionAtLeast compares the leading "major.minor" of a version string.
func versionAtLeast(v string, major, minor int) bool {
	parts := strings.SplitN(v, ".", 3)
	if len(parts) < 2 {
		return false
	}
	a, _ := strconv.Atoi(parts[0])
	b, _ := strconv.Atoi(strings.TrimFunc(parts[1], func(r rune) bool { return r < '0' || r > '9' }))
	return a > major || a == major && b >= minor
}

// Check connects and verifies the account can do what a snapshot needs, naming the GRANT
// that is missing. For `stasis config check`.
func Check(ctx context.Context, cfg Config) error {
	db, conn, err := open(ctx, cfg.DSN)
	if err != nil {
		return err
	}
	defer db.Close()
	defer conn.Close()
	var version, comment string
	if err := conn.QueryRowContext(ctx, "SELECT VERSION(), @@version_comment").Scan(&version, &comment); err != nil {
		return err
	}
	mariadb := strings.Contains(strings.ToLower(version+comment), "mariadb")
	rows, err := conn.QueryContext(ctx, "SHOW GRANTS FOR CURRENT_USER()")
	if err != nil {
		return fmt.Errorf("read grants: %w", err)
	}
	defer rows.Close()
	var grants strings.Builder
	for rows.Next() {
		var g string
		if rows.Scan(&g) == nil {
			grants.WriteString(strings.ToUpper(g) + "\n")
		}
	}
	all := grants.String()
	has := func(p string) bool {
		return strings.Contains(all, "ALL PRIVILEGES ON *.*") || strings.Contains(all, " "+p+",") ||
			strings.Contains(all, " "+p+" ON *.*") || strings.Contains(all, ", "+p+" ON *.*") || strings.Contains(all, "SUPER")
	}
	var missing []string
	if !has("RELOAD") {
		missing = append(missing, "RELOAD")
	}
	binlog := "REPLICATION CLIENT"
	if mariadb && versionAtLeast(version, 10, 5) {
		binlog = "BINLOG MONITOR"
	}
	if !has(binlog) && !has("REPLICATION CLIENT") {
		missing = append(missing, binlog)
	}
	if cfg.LongQueryThreshold > 0 && !has("PROCESS") {
		missing = append(missing, "PROCESS")
	}
	if cfg.KillLongQueries && !has("CONNECTION ADMIN") && !has("SUPER") {
		if mariadb {
			missing = append(missing, "CONNECTION ADMIN")
		} else {
			missing = append(missing, "CONNECTION_ADMIN")
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%w: the account needs GRANT %s ON *.* (it has: %s)", ErrPrivilege, strings.Join(missing, ", "), strings.TrimSpace(all))
	}
	return nil
}

// LongQueries lists queries running longer than the threshold now, which would make the
// lock wait. For stasis doctor.
func LongQueries(ctx context.Context, cfg Config) ([]string, error) {
	db, conn, err := open(ctx, cfg.DSN)
	if err != nil {
		return nil, err
	}
	defer db.Close()
	defer conn.Close()
	threshold := cfg.LongQueryThreshold
	if threshold <= 0 {
		threshold = 20 * time.Second
	}
	long, err := listLongQueries(ctx, conn, threshold)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, q := range long {
		out = append(out, q.String())
	}
	return out, nil
}
