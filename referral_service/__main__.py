from referral_service.cli import main

raise SystemExit(main())
