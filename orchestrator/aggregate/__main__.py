import sys

from orchestrator.aggregate.cli import main

sys.exit(main())
