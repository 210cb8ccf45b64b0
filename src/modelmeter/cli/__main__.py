import sys

from modelmeter.cli.main import main

sys.exit(main())
