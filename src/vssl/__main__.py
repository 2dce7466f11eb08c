"""`python -m vssl ...` is the same as the `vssl` command (and what torchrun launches)."""

from vssl.cli import main

raise SystemExit(main())
