"""The write path: every transport hands a payload to the Writer, which normalises it and submits it
to the Committer; the committer applies each submission (the merge, the quarantine, saved answers)
inside one durable group transaction, and publishes the changes to the live feed after the commit."""
