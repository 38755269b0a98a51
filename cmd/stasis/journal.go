package main

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"sync"
)

// priorityHandler writes text records each prefixed with its syslog priority, "<3>" for
// errors, the way journald reads a service's stderr (SyslogLevelPrefix=), so `journalctl
// -p err` finds the errors while the lines stay as readable as on a terminal.
type priorityHandler struct {
	text slog.Handler
	buf  *bytes.Buffer
	mu   *sync.Mutex
	out  io.Writer
}

var _ slog.Handler = (*priorityHandler)(nil)

func newPriorityHandler(out io.Writer, level slog.Leveler) *priorityHandler {
	buf := &bytes.Buffer{}
	text := slog.NewTextHandler(buf, &slog.HandlerOptions{Level: level, ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
		if len(groups) == 0 && a.Key == slog.TimeKey {
			return slog.Attr{} // journald stamps each line
		}
		return a
	}})
	return &priorityHandler{text: text, buf: buf, mu: &sync.Mutex{}, out: out}
}

// priority maps slog levels to syslog priorities.
func priority(l slog.Level) byte {
	switch {
	case l >= slog.LevelError:
		return '3'
	case l >= slog.LevelWarn:
		return '4'
	case l >= slog.LevelInfo:
		return '6'
	}
	return '7'
}

func (h *priorityHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return h.text.Enabled(ctx, l)
}

func (h *priorityHandler) Handle(ctx context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.buf.Reset()
	h.buf.Write([]byte{'<', priority(r.Level), '>'})
	if err := h.text.Handle(ctx, r); err != nil {
		return err
	}
	_, err := h.out.Write(h.buf.Bytes())
	return err
}

func (h *priorityHandler) WithAttrs(as []slog.Attr) slog.Handler {
	c := *h
	c.text = h.text.WithAttrs(as)
	return &c
}

func (h *priorityHandler) WithGroup(name string) slog.Handler {
	c := *h
	c.text = h.text.WithGroup(name)
	return &c
}
