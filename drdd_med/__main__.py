from drdd_med.cli import main

raise SystemExit(main())
