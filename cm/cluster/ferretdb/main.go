// Command cm-ferretdb is the embedded MongoDB-compatible database server of cm:
// FerretDB (SQLite backend) listening on a Unix socket (what cm uses: only
// whoever may open the socket's directory can connect; FerretDB's SQLite
// backend has no authentication) and/or a TCP address, storing its data in
// one directory (one SQLite file per database).
//
// It is built by build.sh, which applies pushdown.patch to the FerretDB
// sources first; see that file.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/FerretDB/FerretDB/ferretdb"
)

func main() {
	listen := flag.String("listen", "", "TCP `host:port` to listen on (port 0 picks a free one; empty: no TCP)")
	listenUnix := flag.String("listen-unix", "", "Unix socket `path` to listen on (empty: none)")
	dir := flag.String("dir", "", "data `directory` (created if missing); required")
	// not "warn": FerretDB logs every failed command (even the endSessions each pymongo client sends on close,
	// which FerretDB does not implement) at warn level, with the whole response
	logLevel := flag.String("log-level", "error", "log level: debug, info, warn or error")
	flag.Parse()

	if flag.NArg() != 0 {
		fail("unexpected arguments: %s", strings.Join(flag.Args(), " "))
	}

	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		fail("bad -log-level %q: want debug, info, warn or error", *logLevel)
	}

	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	slog.SetDefault(logger)

	if *dir == "" {
		fail("-dir is required")
	}

	if *listen == "" && *listenUnix == "" {
		fail("give -listen-unix PATH or -listen HOST:PORT")
	}

	abs, err := filepath.Abs(*dir)
	if err != nil {
		fail("bad -dir %q: %s", *dir, err)
	}

	// the directory goes into a SQLite URI unescaped
	if strings.ContainsAny(abs, "?#%") {
		fail("bad -dir %q: must not contain '?', '#' or '%%'", abs)
	}

	if err = os.MkdirAll(abs, 0o700); err != nil {
		fail("cannot create data directory: %s", err)
	}

	f, err := ferretdb.New(&ferretdb.Config{
		Listener:  ferretdb.ListenerConfig{TCP: *listen, Unix: *listenUnix},
		Logger:    logger,
		Handler:   "sqlite",
		// WAL with synchronous=NORMAL: a commit survives any process crash (only a power loss can
		// drop the last few); about 30% faster per write than FULL, and cm writes on every job state change
		SQLiteURL: "file:" + abs + "/?_pragma=synchronous(normal)",
	})
	if err != nil {
		fail("%s", err)
	}

	// the first SIGTERM/SIGINT stops gracefully (FerretDB gives connected clients up to 3 s),
	// a second one kills at once
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	go func() {
		<-ctx.Done()
		stop()
	}()

	// the listener is bound by New, so the address is known (and port 0 resolved)
	fmt.Printf("ready %s pid %d dir %s\n", f.MongoDBURI(), os.Getpid(), abs)

	if err = f.Run(ctx); err != nil {
		fail("%s", err)
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "cm-ferretdb: "+format+"\n", args...)
	os.Exit(1)
}
