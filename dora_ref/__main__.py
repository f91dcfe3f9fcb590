"""``python -m dora_ref COMMAND ...``: see ``dora_ref.cli``."""
import sys

from .cli import main

sys.exit(main())
