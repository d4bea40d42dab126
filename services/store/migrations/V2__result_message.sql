-- Where a job's result was posted (so a restart posts it once, never twice).
ALTER TABLE jobs ADD COLUMN result_message_id INTEGER;
