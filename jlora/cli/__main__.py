from jlora.cli import main

raise SystemExit(main())
