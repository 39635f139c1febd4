import sys

from tunnelmesh.cli import main

sys.exit(main())
