"""Backup and disaster recovery with restic: consistent SQLite captures and files staged with a
manifest, snapshotted into an encrypted, deduplicated repository; restore through a staging
folder that is verified before it is swapped in; and a drill that measures the recovery time."""
