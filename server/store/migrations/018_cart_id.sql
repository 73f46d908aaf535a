-- previous release: breaks
-- Breaks: a cart an earlier release opens meanwhile gets no cart_id (it is sent under
-- the sc), and this release names it anew: two carts at the vendor. As PostgreSQL's 034.
-- A session's cart gets an id of its own (rules.cart_step): the GUID of the cart's first
-- state, kept while its lines change and replaced when a purchase (or an identity switch)
-- closes the cart. Remarkety keys carts by id ("keep the same id so that carts don't get
-- duplicated"): the visitor's year-long sc made a shopper's next cart the converted one.
-- A cart open now keeps the id it was sent under until now, its session's sc.
ALTER TABLE sessions ADD COLUMN cart_id TEXT;
UPDATE sessions SET cart_id = sc WHERE cart_guid IS NOT NULL
