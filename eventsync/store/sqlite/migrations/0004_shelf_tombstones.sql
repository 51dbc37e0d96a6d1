-- Shelf places of books that went to the recycle bin. BookStack keeps a trashed book's shelf
-- pivot rows and shows the book on its shelves again when it is restored, with no shelf event
-- (FACTS 2.1, 2.4); the mirror drops the book from its shelves at once, so it remembers here
-- which shelves to re-read when the book comes back.
CREATE TABLE shelf_book_tombstones (
    book_id  INTEGER NOT NULL,
    shelf_id INTEGER NOT NULL,
    PRIMARY KEY (book_id, shelf_id)
);
CREATE INDEX shelf_book_tombstones_shelf ON shelf_book_tombstones (shelf_id);
