import sys

from selfprompt.cli import main

sys.exit(main())
