from binarylm.cli import main

raise SystemExit(main())
