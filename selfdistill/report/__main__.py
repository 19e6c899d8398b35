"""`python -m selfdistill.report DIR ...` (same as `selfdistill-report`)."""

from selfdistill.report import main

main()
