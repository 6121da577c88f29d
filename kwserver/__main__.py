import sys

from kwserver.cli import main

sys.exit(main())
