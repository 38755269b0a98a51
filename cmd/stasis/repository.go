package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/minio/minio-go/v7/pkg/credentials"
	"golang.org/x/term"

	"github.com/stasis-project/stasis/agent/trust"
	"github.com/stasis-project/stasis/chain"
	"github.com/stasis-project/stasis/chain/local"
	"github.com/stasis-project/stasis/chain/s3"
	"github.com/stasis-project/stasis/config"
)

// access is how to reach and unlock repositories: where the passphrase comes from, how to
// reach object storage, where the index cache is. The CLI builds it from flags, the
// environment and the configuration; the agent from its configuration.
type access struct {
	log          *slog.Logger
	passwordFile string // "" : $STASIS_PASSWORD_FILE, $STASIS_PASSWORD, then a prompt
	s3           *config.S3
	cacheDir     string
	host         string // "": $STASIS_HOST, else the hostname
	noPrompt     bool
	// passwordEnvOff ignores $STASIS_PASSWORD_FILE and $STASIS_PASSWORD: they belong to
	// the main repository, not a second one (copy --to, init --copy-keys-from).
	passwordEnvOff bool
}

// isRemote reports whether loc is object storage.
func isRemote(loc string) bool { return config.IsRemote(loc) }

// backend opens (or, with create, makes ready for init) the storage at loc.
func (a *access) backend(ctx context.Context, loc string, create bool) (chain.Backend, error) {
	if isRemote(loc) {
		cfg, err := s3.ParseLocation(loc)
		if err != nil {
			return nil, err
		}
		endpoint := os.Getenv("AWS_ENDPOINT_URL")
		if a.s3 != nil {
			cfg.Region = a.s3.Region
			if a.s3.Endpoint != "" {
				endpoint = a.s3.Endpoint
			}
		}
		if cfg, err = cfg.WithEndpoint(endpoint); err != nil {
			return nil, err
		}
		if cfg.AccessKey, cfg.SecretKey, err = a.s3Credentials(); err != nil {
			return nil, err
		}
		return s3.Open(ctx, cfg)
	}
	if create {
		if entries, err := os.ReadDir(loc); err == nil && len(entries) > 0 {
			if _, err := os.Stat(filepath.Join(loc, "config")); err == nil {
				return nil, fmt.Errorf("%s is already a repository: %w", loc, chain.ErrExists)
			}
			return nil, fmt.Errorf("%s is not empty and is not a stasis repository: choose an empty or new directory", loc)
		}
		return local.Create(loc)
	}
	be, err := local.Open(loc)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, exitError{exitNoRepository, fmt.Errorf("repository %s does not exist; create it with `stasis init -r %s`", loc, loc)}
		}
		return nil, err
	}
	return be, nil
}

// s3Credentials reads the credentials file of the configuration's s3: section, or the
// environment.
func (a *access) s3Credentials() (string, string, error) {
	if a.s3 != nil && a.s3.CredentialsFile != "" {
		if err := trust.Check(a.s3.CredentialsFile, true); err != nil {
			return "", "", fmt.Errorf("s3 credentials_file: %w", err)
		}
		v, err := credentials.NewFileAWSCredentials(a.s3.CredentialsFile, a.s3.Profile).GetWithContext(nil)
		if err != nil {
			return "", "", fmt.Errorf("s3 credentials_file %s: %w", a.s3.CredentialsFile, err)
		}
		return v.AccessKeyID, v.SecretAccessKey, nil
	}
	return os.Getenv("AWS_ACCESS_KEY_ID"), os.Getenv("AWS_SECRET_ACCESS_KEY"), nil
}

// password returns the passphrase source for an encrypted repository: the password file
// (which only root may read), $STASIS_PASSWORD_FILE, $STASIS_PASSWORD, or a prompt on the
// terminal.
func (a *access) password(what string) func() ([]byte, error) {
	return func() ([]byte, error) {
		file := a.passwordFile
		if file == "" && !a.passwordEnvOff {
			file = os.Getenv("STASIS_PASSWORD_FILE")
		}
		if file != "" {
			return readPasswordFile(file)
		}
		if pw := os.Getenv("STASIS_PASSWORD"); pw != "" && !a.passwordEnvOff {
			return []byte(pw), nil
		}
		if a.noPrompt || !term.IsTerminal(int(os.Stdin.Fd())) {
			return nil, exitError{exitPassword, chain.ErrNeedPassword}
		}
		fmt.Fprintf(os.Stderr, "passphrase for %s: ", what)
		pw, err := term.ReadPassword(int(os.Stdin.Fd()))
		fmt.Fprintln(os.Stderr)
		return pw, err
	}
}

// readPasswordFile reads a passphrase file, which must be root's alone.
func readPasswordFile(path string) ([]byte, error) {
	if err := trust.Check(path, true); err != nil {
		return nil, exitError{exitPassword, fmt.Errorf("password file: %w", err)}
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, exitError{exitPassword, fmt.Errorf("password file: %w", err)}
	}
	pw := strings.TrimRight(string(b), "\r\n")
	if pw == "" {
		return nil, exitError{exitPassword, fmt.Errorf("password file %s is empty", path)}
	}
	return []byte(pw), nil
}

// newPassword asks for a new passphrase (twice, on a terminal) or reads the password file.
func (a *access) newPassword(what string) ([]byte, error) {
	file := a.passwordFile
	if file == "" {
		file = os.Getenv("STASIS_PASSWORD_FILE")
	}
	if file != "" {
		return readPasswordFile(file)
	}
	if pw := os.Getenv("STASIS_PASSWORD"); pw != "" {
		return []byte(pw), nil
	}
	if !term.IsTerminal(int(os.Stdin.Fd())) {
		return nil, exitError{exitPassword, fmt.Errorf("a passphrase is needed for %s: give --password-file (or STASIS_PASSWORD_FILE), or run on a terminal", what)}
	}
	fmt.Fprintf(os.Stderr, "new passphrase for %s: ", what)
	pw, err := term.ReadPassword(int(os.Stdin.Fd()))
	fmt.Fprintln(os.Stderr)
	if err != nil {
		return nil, err
	}
	fmt.Fprint(os.Stderr, "again: ")
	again, err := term.ReadPassword(int(os.Stdin.Fd()))
	fmt.Fprintln(os.Stderr)
	if err != nil {
		return nil, err
	}
	if string(pw) != string(again) || len(pw) == 0 {
		return nil, exitError{exitPassword, errors.New("the passphrases differ, or are empty: nothing was changed")}
	}
	return pw, nil
}

func (a *access) options() chain.Options {
	host := a.host
	if host == "" {
		host = os.Getenv("STASIS_HOST")
	}
	return chain.Options{Log: a.log, CacheDir: a.cacheDir, Host: host}
}

// open opens the repository at loc for reading and writing.
func (a *access) open(ctx context.Context, loc string) (*chain.Repository, error) {
	be, err := a.backend(ctx, loc, false)
	if err != nil {
		return nil, err
	}
	opts := a.options()
	opts.Password = a.password(loc)
	r, err := chain.Open(ctx, be, opts)
	if err != nil {
		be.Close()
		return nil, classify(err)
	}
	return r, nil
}

// openReader opens the repository at loc for reading only.
func (a *access) openReader(ctx context.Context, loc string) (*chain.Reader, error) {
	be, err := a.backend(ctx, loc, false)
	if err != nil {
		return nil, err
	}
	opts := a.options()
	opts.Password = a.password(loc)
	r, err := chain.OpenReader(ctx, be, opts)
	if err != nil {
		be.Close()
		return nil, classify(err)
	}
	return r, nil
}

// initRepo creates a repository at loc, encrypted with password if not nil.
func (a *access) initRepo(ctx context.Context, loc string, opts chain.InitOptions) (chain.RepoConfig, error) {
	be, err := a.backend(ctx, loc, true)
	if err != nil {
		return chain.RepoConfig{}, err
	}
	defer be.Close()
	return chain.Init(ctx, be, opts)
}

// openOrInit opens the repository at loc, creating it first when it does not exist (the
// agent's repository, and replicate's): encrypted when the access has a password file.
func (a *access) openOrInit(ctx context.Context, loc string) (*chain.Repository, error) {
	r, err := a.open(ctx, loc)
	if err == nil || !errors.Is(err, chain.ErrNotRepository) && !isMissing(err) {
		return r, err
	}
	opts := chain.InitOptions{}
	if a.passwordFile != "" {
		if opts.Password, err = readPasswordFile(a.passwordFile); err != nil {
			return nil, err
		}
		opts.KDF = chain.TuneKDF(kdfTarget())
	}
	if _, err := a.initRepo(ctx, loc, opts); err != nil {
		return nil, err
	}
	a.log.Info("created repository", "location", loc, "encrypted", opts.Password != nil)
	return a.open(ctx, loc)
}

func isMissing(err error) bool {
	var ee exitError
	return errors.As(err, &ee) && ee.code == exitNoRepository
}

// classify gives repository errors their exit codes.
func classify(err error) error {
	switch {
	case errors.Is(err, chain.ErrWrongPassword), errors.Is(err, chain.ErrNeedPassword):
		var ee exitError
		if errors.As(err, &ee) {
			return err
		}
		return exitError{exitPassword, err}
	case errors.Is(err, chain.ErrNotRepository):
		return exitError{exitNoRepository, err}
	}
	return err
}
