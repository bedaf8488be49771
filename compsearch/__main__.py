import sys

from compsearch.cli import main

sys.exit(main())
