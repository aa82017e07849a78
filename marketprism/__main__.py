from marketprism.ops.cli import main

raise SystemExit(main())
