import sys

from p2pz.cli.main import main

sys.exit(main())
