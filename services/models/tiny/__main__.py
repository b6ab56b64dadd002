import sys

from services.models.tiny.cli import main

sys.exit(main())
