"""The files service: file bytes in an S3 bucket, their metadata in PostgreSQL, size, type and
quota limits enforced while the bytes stream through."""
