from anchorkv.cli import main

raise SystemExit(main())
