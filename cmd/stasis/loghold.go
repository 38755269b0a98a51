package main

import (
	"context"
	"log/slog"
	"sync"
)

var _ slog.Handler = (*holdHandler)(nil)

// holdHandler passes records to the next handler, except while held: then it keeps them in
// memory and writes them on release. Nothing may be written while filesystems are frozen,
// and stderr may be a file on one of them.
type holdHandler struct {
	next  slog.Handler
	state *holdState
}

type holdState struct {
	mu      sync.Mutex
	held    bool
	pending []pendingRecord
}

type pendingRecord struct {
	h slog.Handler
	r slog.Record
}

func newHoldHandler(next slog.Handler) *holdHandler {
	return &holdHandler{next: next, state: &holdState{}}
}

func (h *holdHandler) Enabled(ctx context.Context, l slog.Level) bool { return h.next.Enabled(ctx, l) }

func (h *holdHandler) Handle(ctx context.Context, r slog.Record) error {
	h.state.mu.Lock()
	defer h.state.mu.Unlock()
	if h.state.held {
		h.state.pending = append(h.state.pending, pendingRecord{h.next, r.Clone()})
		return nil
	}
	return h.next.Handle(ctx, r)
}

func (h *holdHandler) WithAttrs(a []slog.Attr) slog.Handler {
	return &holdHandler{next: h.next.WithAttrs(a), state: h.state}
}

func (h *holdHandler) WithGroup(name string) slog.Handler {
	return &holdHandler{next: h.next.WithGroup(name), state: h.state}
}

// Hold starts keeping records in memory.
func (h *holdHandler) Hold() {
	if h == nil {
		return
	}
	h.state.mu.Lock()
	h.state.held = true
	h.state.mu.Unlock()
}

// Release writes the kept records and stops keeping them.
func (h *holdHandler) Release() {
	if h == nil {
		return
	}
	h.state.mu.Lock()
	defer h.state.mu.Unlock()
	h.state.held = false
	for _, p := range h.state.pending {
		p.h.Handle(context.Background(), p.r)
	}
	h.state.pending = nil
}
