from opacus_dmaudit.cli import main

raise SystemExit(main())
