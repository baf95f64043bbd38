#!/usr/bin/env python
"""Cron-style batch conversion: ``drdd-med convert`` with the same arguments, outputs and exit status.

Example crontab line (nightly, yesterday's MR series from a PACS, synthetic CT back to it; the
PACS knows AE title DRDD; status 1 means some series failed, see the report beside the journal):

    0 2 * * * cd /srv/drdd && python scripts/pacs_batch_convert.py dimse://PACS@pacs.local:104 \
        dimse://PACS@pacs.local:104 --calling-aet DRDD --date-from $(date -d yesterday +\\%Y\\%m\\%d) \
        --journal /var/lib/drdd/journal.sqlite --no-progress >> /var/log/drdd-convert.log 2>&1

Run with ``--help`` for every option.
"""

import sys

from drdd_med.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
