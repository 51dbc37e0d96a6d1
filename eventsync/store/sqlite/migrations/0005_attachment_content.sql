-- Attachment content, kept only with EVENTSYNC_ATTACHMENT_CONTENT=true (NULL otherwise):
-- the file itself for uploads, the URL for external links.
ALTER TABLE attachments ADD COLUMN link TEXT;
ALTER TABLE attachments ADD COLUMN content BLOB;
