-- A move or a book sort patches a page's (or chapter's) placement from its parent's listing,
-- without reading the item itself. placed_at is that parent read's time, so an older read of
-- the item does not put the old placement back; read_updated_at is updated_at as the item's
-- own last read gave it, so a patched updated_at is never taken as proof that its content
-- was read.
ALTER TABLE pages ADD COLUMN placed_at REAL;
ALTER TABLE pages ADD COLUMN read_updated_at TEXT;
ALTER TABLE chapters ADD COLUMN placed_at REAL;
ALTER TABLE chapters ADD COLUMN read_updated_at TEXT;
