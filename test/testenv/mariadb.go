package testenv

import (
	"database/sql"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	_ "github.com/go-sql-driver/mysql" // the driver the tests talk to the server with
)

// MariaDB is a server the test started, with its own datadir and socket.
type MariaDB struct {
	Datadir, Socket string
	cmd             *exec.Cmd
	logFile         string
}

// InitMariaDB creates a datadir (root without a password, on the socket only).
func InitMariaDB(t testing.TB, datadir string) {
	t.Helper()
	RequireRoot(t)
	RequireTool(t, "mariadb-install-db")
	out, err := exec.Command("mariadb-install-db", "--no-defaults", "--datadir="+datadir, "--user=root",
		"--auth-root-authentication-method=normal", "--skip-test-db").CombinedOutput()
	if err != nil {
		t.Fatalf("mariadb-install-db: %v\n%s", err, out)
	}
}

// StartMariaDB starts mariadbd on datadir with the binary log on (basename mysql-bin,
// inside the datadir, so a snapshot of the volume holds it) and stops it at cleanup.
func StartMariaDB(t testing.TB, datadir string) *MariaDB {
	t.Helper()
	return StartMariaDBLogBin(t, datadir, "mysql-bin")
}

// StartMariaDBLogBin is StartMariaDB with the binary log's basename given: an absolute
// path puts it on another volume than the datadir.
func StartMariaDBLogBin(t testing.TB, datadir, logBin string) *MariaDB {
	t.Helper()
	RequireTool(t, "mariadbd")
	run := t.TempDir()
	m := &MariaDB{Datadir: datadir, Socket: filepath.Join(run, "mysqld.sock"), logFile: filepath.Join(run, "error.log")}
	m.cmd = exec.Command("mariadbd", "--no-defaults", "--datadir="+datadir, "--socket="+m.Socket,
		"--skip-networking", "--user=root", "--log-bin="+logBin, "--server-id=1", "--sync-binlog=1",
		"--innodb-flush-log-at-trx-commit=1", "--pid-file="+filepath.Join(run, "mysqld.pid"),
		"--log-error="+m.logFile, "--innodb-buffer-pool-size=64M")
	if err := m.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { m.cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		exec.Command("mariadb-admin", "--no-defaults", "-S", m.Socket, "-uroot", "shutdown").Run()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			m.cmd.Process.Kill()
			<-done
		}
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		if db, err := sql.Open("mysql", m.DSN("root", "")); err == nil {
			err = db.Ping()
			db.Close()
			if err == nil {
				return m
			}
		}
		select {
		case <-done:
			b, _ := os.ReadFile(m.logFile)
			t.Fatalf("mariadbd exited:\n%s", b)
		default:
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(m.logFile)
			t.Fatalf("mariadbd did not start:\n%s", b)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// DSN returns a go-sql-driver DSN for user over the server's socket.
func (m *MariaDB) DSN(user, password string) string {
	return fmt.Sprintf("%s:%s@unix(%s)/", user, password, m.Socket)
}

// DB opens a connection pool as root.
func (m *MariaDB) DB(t testing.TB) *sql.DB {
	t.Helper()
	db, err := sql.Open("mysql", m.DSN("root", "")+"?multiStatements=true")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// Exec runs statements as root and fails the test on error.
func (m *MariaDB) Exec(t testing.TB, db *sql.DB, stmts ...string) {
	t.Helper()
	for _, s := range stmts {
		if _, err := db.Exec(s); err != nil {
			t.Fatalf("%s: %v", s, err)
		}
	}
}
