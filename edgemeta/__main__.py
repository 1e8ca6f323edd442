from __future__ import annotations

from edgemeta.cli import main

raise SystemExit(main())
