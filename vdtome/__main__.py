from vdtome.cli import main

raise SystemExit(main())
