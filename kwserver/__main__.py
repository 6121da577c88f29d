import sys

from kwserver.commands.cli import main

sys.exit(main())
