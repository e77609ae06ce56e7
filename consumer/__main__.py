"""`python -m consumer` is `smsq`."""

import sys

from consumer.cli import main

sys.exit(main())
