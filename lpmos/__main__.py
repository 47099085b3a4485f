from lpmos.cli import main

raise SystemExit(main())
