// Command check loads compose files as `docker compose config` does, with compose-go (the loader
// Docker Compose itself runs), and prints the resolved project as JSON: the files are validated
// against the Compose specification, and a test can read a service's resolved environment and
// volumes, without a Docker engine.
//
// Usage (from anywhere): go run . [--profile NAME]... FILE...
package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/compose-spec/compose-go/v2/cli"
)

func main() {
	var files, profiles []string
	args := os.Args[1:]
	for i := 0; i < len(args); i++ {
		if args[i] == "--profile" && i+1 < len(args) {
			profiles = append(profiles, args[i+1])
			i++
			continue
		}
		files = append(files, args[i])
	}
	if len(files) == 0 {
		fail(fmt.Errorf("usage: check [--profile NAME]... FILE..."))
	}
	options, err := cli.NewProjectOptions(files,
		cli.WithWorkingDirectory(filepath.Dir(files[0])),
		cli.WithProfiles(profiles),
		cli.WithOsEnv,
		cli.WithDotEnv,
	)
	if err != nil {
		fail(err)
	}
	project, err := options.LoadProject(context.Background())
	if err != nil {
		fail(err)
	}
	out, err := project.MarshalJSON()
	if err != nil {
		fail(err)
	}
	os.Stdout.Write(out)
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "compose files refused:", err)
	os.Exit(1)
}
