-- Crop and stitch: a job keeps the options its user asked for (after the server's defaults) apart from the request
-- sent to the backend (which gets a crop at the model's working size), and the crop plan that puts the result
-- back into the picture. Jobs from before keep NULL in both: they are posted as the backend returned them.
ALTER TABLE jobs ADD COLUMN options_json TEXT;
ALTER TABLE jobs ADD COLUMN plan_json TEXT;
-- The whole upload is checked (fal-ai/imageutils/nsfw) before a crop of it is sent; a picture is checked once, by
-- its content, however many jobs use it.
CREATE TABLE upload_checks (
    sha256            TEXT PRIMARY KEY,
    nsfw_probability  REAL NOT NULL,
    checked_at        REAL NOT NULL
);
-- Vary Region: a painter link opened on a job's result makes a child of that job.
ALTER TABLE painter_sessions ADD COLUMN parent_job_id INTEGER REFERENCES jobs(id);
-- Drafts and painter links remember the format the picture was uploaded in (their stored copy may be a PNG made
-- from a rotated JPEG): the result comes back in the upload's format.
ALTER TABLE drafts ADD COLUMN source_format TEXT;
ALTER TABLE painter_sessions ADD COLUMN source_format TEXT;
