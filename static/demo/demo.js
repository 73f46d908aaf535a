/* onetag demo shop: a single-page storefront that pushes GA4 e-commerce events into
 * window.dataLayer exactly as a real store would (CONTRACT.md section 5), plus the
 * "What onetag sees" panel. Plain JS, no build step.
 *
 * It never pushes page_view: onetag's runtime sends one per URL on its own (it watches
 * history.pushState and popstate). Money is kept in integer cents and turned into
 * decimal major units only when pushed, so 4.35 stays 4.35.
 */
(function () {
  "use strict";

  var dataLayer = (window.dataLayer = window.dataLayer || []);
  var body = document.body;
  var CURRENCY = "USD";
  var ORIGIN = location.origin;
  var STORE_KEY = "onetag-demo:";

  // ---------------------------------------------------------------- catalog

  var CATEGORIES = [
    { slug: "kitchen", name: "Kitchen", blurb: "Mugs, spoons and towels for slow mornings." },
    { slug: "stationery", name: "Stationery", blurb: "Paper and pencils that get things written." },
    { slug: "apparel", name: "Apparel", blurb: "Soft basics in organic fibres." }
  ];

  // cents: price in integer minor units. sizes: apparel gets the size guide (a custom event).
  var PRODUCTS = [
    { sku: "SKU-1001", name: "Enamel Camp Mug", cents: 1999, cat: "kitchen", sub: "Mugs", brand: "Acme",
      desc: "A 350 ml enamel mug with a rolled rim. Goes from campfire to desk.", stock: true },
    { sku: "SKU-1002", name: "Bamboo Teaspoon", cents: 435, cat: "kitchen", sub: "Utensils", brand: "Acme",
      desc: "A light bamboo teaspoon, oiled by hand.", stock: true },
    { sku: "SKU-1003", name: "Linen Tea Towel", cents: 1250, cat: "kitchen", sub: "Textiles", brand: "Fieldhouse",
      desc: "Stonewashed linen, 50 x 70 cm, with a hanging loop.", stock: true },
    { sku: "SKU-2001", name: "Dot Grid Notebook A5", cents: 899, cat: "stationery", sub: "Notebooks", brand: "Papermill",
      desc: "160 pages of 100 gsm dot grid paper, lay-flat binding.", stock: true },
    { sku: "SKU-2002", name: "Graphite Pencil HB", cents: 57, cat: "stationery", sub: "Pencils", brand: "Papermill",
      desc: "Cedar pencil with an HB core and a pink eraser.", stock: true },
    { sku: "SKU-2003", name: "Brass Paper Clips (100)", cents: 210, cat: "stationery", sub: "Desk", brand: "Papermill",
      desc: "A tin of one hundred solid brass paper clips.", stock: true },
    { sku: "SKU-3001", name: "Organic Cotton Tee", cents: 2400, cat: "apparel", sub: "T-shirts", brand: "Fieldhouse",
      desc: "Heavyweight organic cotton, relaxed fit.", stock: true, sizes: true },
    { sku: "SKU-3002", name: "Merino Beanie", cents: 2995, cat: "apparel", sub: "Hats", brand: "Fieldhouse",
      desc: "Ribbed merino wool beanie. Back in stock soon.", stock: false, sizes: true }
  ];

  var COUPONS = { DEMO10: 10 }; // code -> percent off the items subtotal
  var TAX_PERCENT = 8;
  var SHIPPING_CENTS = 499;
  var FREE_SHIPPING_FROM_CENTS = 5000;

  function product(sku) {
    for (var i = 0; i < PRODUCTS.length; i++) if (PRODUCTS[i].sku === sku) return PRODUCTS[i];
    return null;
  }
  function category(slug) {
    for (var i = 0; i < CATEGORIES.length; i++) if (CATEGORIES[i].slug === slug) return CATEGORIES[i];
    return null;
  }
  function productsIn(slug) {
    return PRODUCTS.filter(function (p) { return p.cat === slug; });
  }
  function imagePath(p) { return "/static/demo/img/" + p.sku.toLowerCase() + ".svg"; }
  function productPath(p) { return "/demo/p/" + encodeURIComponent(p.sku); }

  // ---------------------------------------------------------------- money (integer cents)

  function major(cents) { return cents / 100; } // 435 -> 4.35 (the same double as the literal)
  function fmt(cents) {
    var sign = cents < 0 ? "-" : "";
    var c = Math.abs(cents);
    var rest = String(c % 100);
    return sign + "$" + Math.floor(c / 100) + "." + (rest.length < 2 ? "0" + rest : rest);
  }
  function percentOf(cents, percent) { return Math.round((cents * percent) / 100); }

  // ---------------------------------------------------------------- storage

  function load(key, fallback) {
    try {
      var v = localStorage.getItem(STORE_KEY + key);
      return v === null ? fallback : JSON.parse(v);
    } catch (e) { return fallback; }
  }
  function save(key, value) {
    try { localStorage.setItem(STORE_KEY + key, JSON.stringify(value)); } catch (e) { /* private mode */ }
  }

  // cart: [{sku, qty}] in the order items were first added
  var cart = load("cart", []).filter(function (l) { return product(l.sku) && l.qty > 0; });
  var wishlist = load("wishlist", []);
  function saveCart() { save("cart", cart); updateCartCount(); }
  function cartLine(sku) {
    for (var i = 0; i < cart.length; i++) if (cart[i].sku === sku) return cart[i];
    return null;
  }
  function cartCents() {
    return cart.reduce(function (s, l) { return s + product(l.sku).cents * l.qty; }, 0);
  }
  function cartQty() { return cart.reduce(function (s, l) { return s + l.qty; }, 0); }

  // ---------------------------------------------------------------- GA4 pushes

  function gaItem(p, qty) {
    var c = category(p.cat);
    return {
      item_id: p.sku,
      item_name: p.name,
      price: major(p.cents),
      quantity: qty,
      item_category: c.name,
      item_category2: p.sub,
      item_brand: p.brand,
      item_url: ORIGIN + productPath(p),
      image_url: ORIGIN + imagePath(p),
      description: p.desc,
      in_stock: p.stock
    };
  }
  function cartItems() {
    return cart.map(function (l) { return gaItem(product(l.sku), l.qty); });
  }
  function push(obj) {
    dataLayer.push(obj);
    panelDataLayerSoon();
  }
  // The shop's own server, the trusted side (docs/security.md). A shop signs its signed-in
  // customer's email when it renders the page; the demo has no accounts, so its stand-in
  // signs the email typed. Without the signature onetag takes the push as a claim.
  function withSignature(email, then) {
    fetch("/demo/identity", { method: "POST", credentials: "same-origin",
                              headers: { "Content-Type": "application/json" },
                              body: JSON.stringify({ email: email }) })
      .then(function (response) { return response.json(); })
      .then(function (answer) { then({ email: email, signature: answer.signature }); },
            function () { then({ email: email }); });
  }
  // What a shop's order webhook does: report the order from the backend, as a fact.
  function reportOrder(user, ecommerce) {
    fetch("/demo/order", { method: "POST", credentials: "same-origin", keepalive: true,
                           headers: { "Content-Type": "application/json" },
                           body: JSON.stringify({ user: user, ecommerce: ecommerce }) });
  }

  function pushCartChange(name, p, qtyDelta) {
    push({ event: name, ecommerce: { currency: CURRENCY, value: major(p.cents * qtyDelta),
                                     items: [gaItem(p, qtyDelta)] } });
    push({ event: "cart_updated", ecommerce: { currency: CURRENCY, value: major(cartCents()), items: cartItems() } });
  }

  function addToCart(p, qty) {
    var line = cartLine(p.sku);
    if (line) line.qty += qty; else cart.push({ sku: p.sku, qty: qty });
    saveCart();
    pushCartChange("add_to_cart", p, qty);
  }
  function removeFromCart(p, qty) {
    var line = cartLine(p.sku);
    if (!line) return;
    qty = Math.min(qty, line.qty);
    line.qty -= qty;
    if (line.qty <= 0) cart = cart.filter(function (l) { return l.sku !== p.sku; });
    saveCart();
    pushCartChange("remove_from_cart", p, qty);
  }

  // ---------------------------------------------------------------- DOM helpers

  function el(tag, attrs) {
    var node = document.createElement(tag);
    if (attrs) {
      for (var k in attrs) {
        if (!Object.prototype.hasOwnProperty.call(attrs, k) || attrs[k] == null || attrs[k] === false) continue;
        var v = attrs[k];
        if (k === "class") node.className = v;
        else if (k === "testid") node.setAttribute("data-testid", v);
        else if (k === "text") node.textContent = v;
        else if (k.slice(0, 2) === "on") node.addEventListener(k.slice(2), v);
        else if (v === true) node.setAttribute(k, "");
        else node.setAttribute(k, v);
      }
    }
    for (var i = 2; i < arguments.length; i++) append(node, arguments[i]);
    return node;
  }
  function append(node, child) {
    if (child == null || child === false) return;
    if (Array.isArray(child)) { child.forEach(function (c) { append(node, c); }); return; }
    node.appendChild(typeof child === "string" || typeof child === "number"
      ? document.createTextNode(String(child)) : child);
  }
  function $(sel, root) { return (root || document).querySelector(sel); }
  function byTestId(id, root) { return $('[data-testid="' + id + '"]', root); }
  function link(href, attrs) {
    var a = el.apply(null, ["a", Object.assign({ href: href }, attrs || {})].concat([].slice.call(arguments, 2)));
    return a;
  }

  var toastTimer = null;
  function toast(msg) {
    var t = byTestId("toast");
    t.textContent = msg;
    t.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(function () { t.hidden = true; }, 2200);
  }
  function updateCartCount() {
    byTestId("cart-count").textContent = String(cartQty());
  }

  // ---------------------------------------------------------------- views

  function productCard(p) {
    return el("article", { class: "card", testid: "product-card", "data-sku": p.sku },
      link(productPath(p), { class: "card-image", tabindex: "-1", "aria-hidden": "true" },
        el("img", { src: imagePath(p), alt: "", width: "240", height: "240", loading: "lazy" })),
      el("div", { class: "card-body" },
        el("div", { class: "card-brand", text: p.brand }),
        link(productPath(p), { class: "card-title", testid: "product-link", "data-sku": p.sku }, p.name),
        el("div", { class: "card-foot" },
          el("span", { class: "price", text: fmt(p.cents) }),
          p.stock ? null : el("span", { class: "badge badge-muted", text: "Out of stock" }))));
  }

  function listView(opts) {
    // opts: {route, testid, title, heading, blurb, listId, listName, products}
    return {
      title: opts.title,
      node: el("section", { class: "page", testid: opts.testid },
        el("div", { class: "page-head" },
          el("h1", { text: opts.heading }),
          el("p", { class: "muted", text: opts.blurb })),
        el("div", { class: "grid", testid: "product-grid" }, opts.products.map(productCard))),
      enter: function () {
        push({ event: "view_item_list", ecommerce: {
          currency: CURRENCY, item_list_id: opts.listId, item_list_name: opts.listName,
          items: opts.products.map(function (p) { return gaItem(p, 1); }) } });
      }
    };
  }

  var VIEWS = {
    home: function () {
      return listView({ testid: "page-home", title: "All products", heading: "All products",
        blurb: "Eight small things in three categories. Open one, add it to the cart, check out.",
        listId: "all", listName: "All products", products: PRODUCTS });
    },

    category: function (route) {
      var c = category(route.slug);
      if (!c) return VIEWS["not-found"](route);
      return listView({ testid: "page-category", title: c.name, heading: c.name, blurb: c.blurb,
        listId: c.slug, listName: c.name, products: productsIn(c.slug) });
    },

    product: function (route) {
      var p = product(route.sku);
      if (!p) return VIEWS["not-found"](route);
      var c = category(p.cat);
      var inWishlist = wishlist.indexOf(p.sku) >= 0;
      var wishBtn = el("button", { type: "button", class: "btn btn-ghost", testid: "add-to-wishlist",
        disabled: inWishlist, onclick: function () {
          if (wishlist.indexOf(p.sku) < 0) { wishlist.push(p.sku); save("wishlist", wishlist); }
          push({ event: "add_to_wishlist", ecommerce: { currency: CURRENCY, value: major(p.cents), items: [gaItem(p, 1)] } });
          wishBtn.textContent = "In your wishlist";
          wishBtn.disabled = true;
          toast(p.name + " added to your wishlist");
        } }, inWishlist ? "In your wishlist" : "Add to wishlist");
      var sizeTable = el("table", { class: "size-table", testid: "size-guide-table", hidden: true },
        el("tr", null, el("th", { text: "Size" }), el("th", { text: "Chest (cm)" }), el("th", { text: "Length (cm)" })),
        [["S", "92", "68"], ["M", "100", "71"], ["L", "108", "74"], ["XL", "116", "77"]].map(function (r) {
          return el("tr", null, r.map(function (x) { return el("td", { text: x }); }));
        }));
      return {
        title: p.name,
        node: el("section", { class: "page product-page", testid: "page-product", "data-sku": p.sku },
          el("nav", { class: "crumbs" }, link("/demo/", null, "All products"), " / ",
            link("/demo/c/" + c.slug, { testid: "breadcrumb-category" }, c.name), " / ", el("span", { text: p.name })),
          el("div", { class: "product" },
            el("img", { class: "product-image", src: imagePath(p), alt: p.name, width: "240", height: "240" }),
            el("div", { class: "product-info" },
              el("div", { class: "card-brand", text: p.brand + " · " + p.sub }),
              el("h1", { testid: "product-title", text: p.name }),
              el("div", { class: "product-price price", testid: "product-price", text: fmt(p.cents) }),
              el("p", { class: "desc", text: p.desc }),
              el("p", { class: p.stock ? "stock in" : "stock out", testid: "product-stock",
                        text: p.stock ? "In stock, ships tomorrow" : "Out of stock" }),
              el("div", { class: "actions" },
                el("button", { type: "button", class: "btn", testid: "add-to-cart", disabled: !p.stock,
                  onclick: function () { addToCart(p, 1); toast(p.name + " added to your cart"); } }, "Add to cart"),
                wishBtn),
              p.sizes ? el("div", { class: "size-guide" },
                el("button", { type: "button", class: "linklike", testid: "size-guide", onclick: function () {
                  // a custom event: any name outside the vocabulary is forwarded as-is
                  push({ event: "size_guide_opened", item_id: p.sku, item_name: p.name, page_type: "product" });
                  sizeTable.hidden = !sizeTable.hidden;
                } }, "Size guide"),
                sizeTable) : null))),
        enter: function () {
          push({ event: "view_item", ecommerce: { currency: CURRENCY, value: major(p.cents), items: [gaItem(p, 1)] } });
        }
      };
    },

    search: function (route) {
      var q = route.q.trim();
      var needle = q.toLowerCase();
      var results = !q ? [] : PRODUCTS.filter(function (p) {
        return [p.name, p.brand, p.sub, category(p.cat).name, p.desc, p.sku].join(" ").toLowerCase().indexOf(needle) >= 0;
      });
      var input = byTestId("search-input");
      if (input && document.activeElement !== input) input.value = q;
      var content;
      if (!q) content = el("p", { class: "muted", testid: "search-empty-query", text: "Type something to search for." });
      else if (!results.length) {
        content = el("div", { class: "empty", testid: "search-no-results" },
          el("p", null, "Nothing matches ", el("strong", { text: "\u201c" + q + "\u201d" }), "."),
          el("p", { class: "muted" }, "Try \u201cmug\u201d, \u201cpencil\u201d or ", link("/demo/", null, "browse everything"), "."));
      } else content = el("div", { class: "grid", testid: "search-results" }, results.map(productCard));
      return {
        title: q ? "Search: " + q : "Search",
        node: el("section", { class: "page", testid: "page-search", "data-query": q },
          el("div", { class: "page-head" },
            el("h1", { text: q ? "Results for \u201c" + q + "\u201d" : "Search" }),
            q ? el("p", { class: "muted", testid: "search-count",
                          text: results.length + (results.length === 1 ? " product" : " products") }) : null),
          content),
        enter: function () {
          if (!q) return;
          push({ event: "search", search_term: q, ecommerce: { currency: CURRENCY,
            items: results.map(function (p) { return gaItem(p, 1); }) } });
        }
      };
    },

    cart: function () {
      var page = el("section", { class: "page", testid: "page-cart" });
      function draw() {
        page.textContent = "";
        append(page, el("div", { class: "page-head" }, el("h1", { text: "Your cart" })));
        if (!cart.length) {
          append(page, el("div", { class: "empty", testid: "cart-empty" },
            el("p", { text: "Your cart is empty." }), link("/demo/", { class: "btn", testid: "continue-shopping" }, "Browse products")));
          return;
        }
        append(page, el("div", { class: "cart-lines" }, cart.map(function (l) {
          var p = product(l.sku);
          return el("div", { class: "cart-line", testid: "cart-line", "data-sku": p.sku },
            el("img", { src: imagePath(p), alt: "", width: "64", height: "64" }),
            el("div", { class: "cart-line-info" },
              link(productPath(p), { class: "cart-line-name" }, p.name),
              el("div", { class: "muted", text: fmt(p.cents) + " each" })),
            el("div", { class: "qty" },
              el("button", { type: "button", class: "qty-btn", testid: "cart-qty-minus", "data-sku": p.sku,
                "aria-label": "One less " + p.name, onclick: function () { removeFromCart(p, 1); draw(); } }, "\u2212"),
              el("span", { class: "qty-value", testid: "cart-qty", "data-sku": p.sku, text: String(l.qty) }),
              el("button", { type: "button", class: "qty-btn", testid: "cart-qty-plus", "data-sku": p.sku,
                "aria-label": "One more " + p.name, onclick: function () { addToCart(p, 1); draw(); } }, "+")),
            el("div", { class: "line-total", testid: "cart-line-total", text: fmt(p.cents * l.qty) }),
            el("button", { type: "button", class: "linklike remove", testid: "cart-remove", "data-sku": p.sku,
              onclick: function () { removeFromCart(p, cartLine(p.sku).qty); draw(); } }, "Remove"));
        })));
        append(page, el("div", { class: "cart-summary" },
          el("div", { class: "summary-row total" }, el("span", { text: "Subtotal" }),
            el("span", { testid: "cart-total", text: fmt(cartCents()) })),
          link("/demo/checkout", { class: "btn", testid: "go-to-checkout" }, "Checkout")));
      }
      draw();
      return {
        title: "Cart",
        node: page,
        enter: function () {
          push({ event: "view_cart", ecommerce: { currency: CURRENCY, value: major(cartCents()), items: cartItems() } });
        }
      };
    },

    checkout: function () {
      if (!cart.length) {
        return { title: "Checkout", node: el("section", { class: "page", testid: "page-checkout" },
          el("div", { class: "page-head" }, el("h1", { text: "Checkout" })),
          el("div", { class: "empty", testid: "checkout-empty" }, el("p", { text: "Your cart is empty." }),
            link("/demo/", { class: "btn", testid: "continue-shopping" }, "Browse products"))),
          enter: function () {} };
      }
      var known = load("email", "");
      var f = {};
      function field(name, label, attrs) {
        f[name] = el("input", Object.assign({ name: name, testid: "checkout-" + name.replace(/_/g, "-") }, attrs));
        return el("label", { class: "field" }, el("span", { text: label }), f[name]);
      }
      var summary = el("div", { class: "cart-summary", testid: "checkout-summary" });
      var error = el("p", { class: "error", testid: "checkout-error", hidden: true });
      function totals() {
        var code = f.coupon.value.trim().toUpperCase();
        var subtotal = cartCents();
        var discount = COUPONS[code] ? percentOf(subtotal, COUPONS[code]) : 0;
        var value = subtotal - discount;
        var tax = percentOf(value, TAX_PERCENT);
        var shipping = value >= FREE_SHIPPING_FROM_CENTS ? 0 : SHIPPING_CENTS;
        return { code: code, valid: !code || !!COUPONS[code], subtotal: subtotal, discount: discount,
                 value: value, tax: tax, shipping: shipping, total: value + tax + shipping };
      }
      function drawSummary() {
        var t = totals();
        summary.textContent = "";
        function row(label, cents, testid, cls) {
          return el("div", { class: "summary-row" + (cls ? " " + cls : "") }, el("span", { text: label }),
            el("span", { testid: testid, text: fmt(cents) }));
        }
        append(summary, [
          cart.map(function (l) {
            var p = product(l.sku);
            return el("div", { class: "summary-row item" }, el("span", { text: l.qty + " \u00d7 " + p.name }),
              el("span", { text: fmt(p.cents * l.qty) }));
          }),
          row("Subtotal", t.subtotal, "checkout-subtotal"),
          t.discount ? row("Discount (" + t.code + ")", -t.discount, "checkout-discount") : null,
          row("Tax (" + TAX_PERCENT + "%)", t.tax, "checkout-tax"),
          row(t.shipping ? "Shipping" : "Shipping (free from " + fmt(FREE_SHIPPING_FROM_CENTS) + ")", t.shipping, "checkout-shipping"),
          row("Total", t.total, "checkout-total", "total"),
          t.valid ? null : el("p", { class: "error", text: "Unknown coupon \u201c" + t.code + "\u201d. Try DEMO10." })
        ]);
      }
      var placeBtn = el("button", { type: "submit", class: "btn btn-wide", testid: "place-order" }, "Place order");
      var form = el("form", { class: "checkout-form", testid: "checkout-form", novalidate: true },
        el("h2", { text: "Contact" }),
        field("email", "Email", { type: "email", required: true, autocomplete: "email", value: known }),
        el("div", { class: "field-row" },
          field("first_name", "First name", { type: "text", autocomplete: "given-name" }),
          field("last_name", "Last name", { type: "text", autocomplete: "family-name" })),
        el("label", { class: "check" },
          f.accepts_marketing = el("input", { type: "checkbox", name: "accepts_marketing", testid: "checkout-accepts-marketing" }),
          el("span", { text: "Email me news and offers" })),
        el("h2", { text: "Coupon" }),
        field("coupon", "Coupon code", { type: "text", value: "DEMO10", autocomplete: "off" }),
        error, placeBtn);
      f.coupon.addEventListener("input", drawSummary);
      form.addEventListener("submit", function (ev) {
        ev.preventDefault();
        var email = f.email.value.trim();
        var t = totals();
        var problem = !email || !f.email.checkValidity() ? "Enter a valid email address."
          : !t.valid ? "Remove or fix the coupon code." : "";
        error.textContent = problem;
        error.hidden = !problem;
        if (problem || !cart.length) return;
        placeBtn.disabled = true;

        var user = { email: email };
        if (f.first_name.value.trim()) user.first_name = f.first_name.value.trim();
        if (f.last_name.value.trim()) user.last_name = f.last_name.value.trim();
        user.accepts_marketing = f.accepts_marketing.checked;
        push({ event: "identify", user: user });

        var orderId = "DEMO-" + Date.now().toString(36).toUpperCase() + "-" +
          Math.floor(Math.random() * 46656).toString(36).toUpperCase();
        var ecommerce = { transaction_id: orderId, currency: CURRENCY, value: major(t.value),
                          tax: major(t.tax), shipping: major(t.shipping), items: cartItems() };
        if (t.code) ecommerce.coupon = t.code;
        push({ event: "purchase", ecommerce: ecommerce }); // for the vendors' own libraries
        reportOrder(user, ecommerce); // the order itself, from the shop's backend

        save("email", email);
        save("last-order", { id: orderId, total: t.total, items: cartQty(), email: email });
        cart = [];
        saveCart();
        navigate("/demo/thanks");
      });
      drawSummary();
      return {
        title: "Checkout",
        node: el("section", { class: "page", testid: "page-checkout" },
          el("div", { class: "page-head" }, el("h1", { text: "Checkout" })),
          el("div", { class: "checkout" }, form, el("div", null, el("h2", { text: "Order summary" }), summary))),
        enter: function () {
          push({ event: "begin_checkout", ecommerce: { currency: CURRENCY, value: major(cartCents()), items: cartItems() } });
        }
      };
    },

    thanks: function () {
      var order = load("last-order", null);
      return {
        title: "Thank you",
        node: el("section", { class: "page thanks", testid: "page-thanks" },
          el("div", { class: "thanks-mark", "aria-hidden": "true", text: "\u2713" }),
          el("h1", { text: "Thank you for your order" }),
          order ? el("p", null, "Order ", el("strong", { testid: "order-number", text: order.id }), " \u00b7 ",
            el("span", { testid: "order-total", text: fmt(order.total) }), " \u00b7 confirmation goes to ",
            el("span", { text: order.email })) : el("p", { class: "muted", text: "No recent order in this browser." }),
          el("p", { class: "muted", text: "The purchase went to onetag once; each vendor got it the way it wants it." }),
          link("/demo/", { class: "btn", testid: "continue-shopping" }, "Continue shopping")),
        enter: function () {}
      };
    },

    "not-found": function () {
      return {
        title: "Not found",
        node: el("section", { class: "page", testid: "page-not-found" },
          el("h1", { text: "Nothing here" }),
          el("p", null, "That page doesn't exist. ", link("/demo/", null, "Back to the shop"), ".")),
        enter: function () {}
      };
    }
  };

  // ---------------------------------------------------------------- router

  function parseRoute(url) {
    var path = url.pathname.replace(/\/+$/, "");
    var m;
    if (path === "/demo" || path === "") return { name: "home" };
    if ((m = /^\/demo\/c\/([^/]+)$/.exec(path))) return { name: "category", slug: decodeURIComponent(m[1]) };
    if ((m = /^\/demo\/p\/([^/]+)$/.exec(path))) return { name: "product", sku: decodeURIComponent(m[1]) };
    if (path === "/demo/search") return { name: "search", q: url.searchParams.get("q") || "" };
    if (path === "/demo/cart") return { name: "cart" };
    if (path === "/demo/checkout") return { name: "checkout" };
    if (path === "/demo/thanks") return { name: "thanks" };
    return { name: "not-found" };
  }

  function routeName(route, view) {
    // unknown category/sku renders the not-found view
    return view.node.getAttribute("data-testid") === "page-not-found" ? "not-found" : route.name;
  }

  // Build the view first (no side effects), set the title, then change the URL (onetag's
  // runtime sends its page_view here), then show the page and push the page's own event.
  function show(url, how) {
    var route = parseRoute(url);
    var view = VIEWS[route.name](route);
    document.title = view.title + " \u00b7 onetag demo shop";
    if (how === "push") history.pushState({ demo: true }, "", url.pathname + url.search + url.hash);
    else if (how === "replace") history.replaceState({ demo: true }, "", url.pathname + url.search + url.hash);
    var app = $("#app");
    app.textContent = "";
    app.appendChild(view.node);
    var name = routeName(route, view);
    body.dataset.route = name;
    markNav(url);
    if (how === "push") window.scrollTo(0, 0);
    view.enter();
  }

  function navigate(href) {
    var url = new URL(href, location.href);
    if (url.pathname + url.search === location.pathname + location.search) {
      window.scrollTo(0, 0);
      return;
    }
    show(url, "push");
  }

  function markNav(url) {
    var links = document.querySelectorAll(".category-nav a");
    for (var i = 0; i < links.length; i++) {
      var a = links[i];
      var on = new URL(a.href).pathname.replace(/\/+$/, "") === url.pathname.replace(/\/+$/, "");
      if (on) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
    }
  }

  document.addEventListener("click", function (ev) {
    if (ev.defaultPrevented || ev.button !== 0 || ev.metaKey || ev.ctrlKey || ev.shiftKey || ev.altKey) return;
    var a = ev.target.closest && ev.target.closest("a[href]");
    if (!a || a.target || a.hasAttribute("download")) return;
    var url = new URL(a.href, location.href);
    if (url.origin !== location.origin || !/^\/demo(\/|$)/.test(url.pathname) || url.pathname === "/demo/session") return;
    ev.preventDefault();
    navigate(url.href);
  });
  window.addEventListener("popstate", function () { show(new URL(location.href), "none"); });

  // ---------------------------------------------------------------- header and footer forms

  function showSignedIn(email) {
    var box = byTestId("account");
    $(".signin-form", box).hidden = !!email;
    $(".signed-in", box).hidden = !email;
    byTestId("signed-in-as").textContent = email ? "Signed in as " + email : "";
    var consent = byTestId("consent-email");
    if (email && !consent.value) consent.value = email;
  }

  byTestId("search-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var q = byTestId("search-input").value.trim();
    navigate("/demo/search?q=" + encodeURIComponent(q));
  });

  byTestId("signin-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var input = byTestId("signin-email");
    var email = input.value.trim();
    if (!email || !input.checkValidity()) { input.reportValidity(); return; }
    withSignature(email, function (user) { push({ event: "identify", user: user }); });
    save("email", email);
    input.value = "";
    showSignedIn(email);
    toast("Signed in as " + email);
  });

  byTestId("signout").addEventListener("click", function () {
    // The demo only forgets the email locally; onetag's session stays identified.
    save("email", "");
    showSignedIn("");
  });

  byTestId("newsletter-form").addEventListener("submit", function (ev) {
    ev.preventDefault(); // no dataLayer push on purpose: onetag picks the typed email up itself
    var input = byTestId("newsletter-email");
    var status = byTestId("newsletter-status");
    if (!input.value.trim() || !input.checkValidity()) {
      status.textContent = "Enter a valid email address.";
    } else {
      status.textContent = "Thanks! The page pushed nothing; onetag's runtime saw the email you typed.";
    }
    status.hidden = false;
  });

  function consent(eventName) {
    var input = byTestId("consent-email");
    var status = byTestId("consent-status");
    var email = input.value.trim();
    status.hidden = false;
    if (!email || !input.checkValidity()) { status.textContent = "Enter a valid email address first."; return; }
    withSignature(email, function (user) { push({ event: eventName, user: user }); });
    status.textContent = eventName === "unsubscribe"
      ? email + " is unsubscribed from marketing email."
      : email + " is opted in to marketing email.";
  }
  byTestId("unsubscribe").addEventListener("click", function () { consent("unsubscribe"); });
  byTestId("opt-in").addEventListener("click", function () { consent("opt_in"); });

  // ---------------------------------------------------------------- "What onetag sees" panel

  var layout = $("#layout");
  var panelToggle = byTestId("panel-toggle");
  function setPanel(open) {
    layout.classList.toggle("panel-collapsed", !open);
    panelToggle.setAttribute("aria-expanded", String(open));
    panelToggle.innerHTML = open ? "&#x276F;" : "&#x276E;";
    save("panel-open", open);
  }
  panelToggle.addEventListener("click", function () { setPanel(layout.classList.contains("panel-collapsed")); });

  var ZERO_DECIMALS = { JPY: 1, KRW: 1, VND: 1, CLP: 1, ISK: 1 };
  function fmtMinor(minor, currency) {
    currency = currency || CURRENCY;
    if (ZERO_DECIMALS[currency]) return minor + " " + currency;
    return (currency === "USD" ? fmt(minor) : fmt(minor).replace("$", "") + " " + currency);
  }
  function clock(ms) {
    if (typeof ms !== "number") return "";
    var d = new Date(ms);
    function two(n) { return (n < 10 ? "0" : "") + n; }
    return two(d.getHours()) + ":" + two(d.getMinutes()) + ":" + two(d.getSeconds());
  }
  function short(value, max) {
    var s;
    try { s = JSON.stringify(value); } catch (e) { s = String(value); }
    if (s === undefined) s = String(value);
    return s.length > max ? s.slice(0, max - 1) + "\u2026" : s;
  }
  function pretty(value) {
    try { return JSON.stringify(value, null, 2); } catch (e) { return String(value); }
  }
  function itemsText(items) {
    if (!Array.isArray(items)) return null;
    if (!items.length) return "no items";
    var ids = items.slice(0, 3).map(function (i) {
      var q = i.quantity != null && i.quantity !== 1 ? i.quantity + "\u00d7" : "";
      return q + (i.item_id || i.item_name || "?");
    });
    return ids.join(", ") + (items.length > 3 ? " +" + (items.length - 3) : "");
  }

  // Key fields of one stored event (the normalised shape of docs/architecture.md, tolerant
  // of the raw GA4 shape too).
  function eventFacts(e) {
    var facts = [];
    var ec = e.ecommerce || {};
    if (ec.transaction_id) facts.push("order " + ec.transaction_id);
    if (ec.value_minor != null) facts.push(fmtMinor(ec.value_minor, ec.currency));
    else if (ec.value != null) facts.push(String(ec.value) + " " + (ec.currency || ""));
    var it = itemsText(ec.items);
    if (it) facts.push(it);
    if (ec.item_list_name) facts.push("list " + ec.item_list_name);
    if (e.search_term != null) facts.push("\u201c" + e.search_term + "\u201d");
    if (e.user && (e.user.email || e.user.customer_id)) facts.push(e.user.email || "customer " + e.user.customer_id);
    if (e.status) facts.push("status " + e.status);
    var name = e.name || e.event;
    if (name === "page_view" && e.page && e.page.location) {
      try { facts.push(new URL(e.page.location).pathname + new URL(e.page.location).search); }
      catch (err) { facts.push(e.page.location); }
    }
    if (e.properties && typeof e.properties === "object") {
      Object.keys(e.properties).slice(0, 3).forEach(function (k) { facts.push(k + "=" + short(e.properties[k], 30)); });
    }
    return facts;
  }

  var openEvents = {}; // event_id -> true while its details are open
  var lastSessionText = null;
  var sessionInFlight = false;

  function setStatus(text, kind) {
    var s = byTestId("panel-status");
    s.textContent = text;
    s.className = "panel-status" + (kind ? " " + kind : "");
  }

  function renderIdentity(identity) {
    var box = byTestId("panel-identity");
    box.textContent = "";
    if (!identity || typeof identity !== "object" || (!identity.email && !identity.customer_id)) {
      append(box, el("span", { class: "muted", text: "Anonymous: no email known yet" }));
      return;
    }
    var name = [identity.first_name, identity.last_name].filter(Boolean).join(" ");
    append(box, [
      el("div", { class: "kv-row" }, el("span", { text: "email" }), el("strong", { testid: "panel-identity-email", text: identity.email || "\u2014" })),
      name ? el("div", { class: "kv-row" }, el("span", { text: "name" }), el("span", { text: name })) : null,
      identity.customer_id ? el("div", { class: "kv-row" }, el("span", { text: "customer" }), el("span", { text: String(identity.customer_id) })) : null,
      identity.accepts_marketing != null ? el("div", { class: "kv-row" }, el("span", { text: "marketing" }),
        el("span", { text: identity.accepts_marketing ? "accepts" : "declines" })) : null
    ]);
  }

  function renderCart(sc) {
    var box = byTestId("panel-cart");
    box.textContent = "";
    var items = sc && Array.isArray(sc.items) ? sc.items : [];
    if (!items.length) { append(box, el("span", { class: "muted", text: "Empty" })); return; }
    var cur = sc.currency || CURRENCY;
    append(box, el("table", { class: "mini-table" }, items.map(function (i) {
      var price = i.price_minor != null ? fmtMinor(i.price_minor, cur) : i.price != null ? String(i.price) : "";
      return el("tr", { testid: "panel-cart-item", "data-sku": i.item_id },
        el("td", { text: (i.quantity != null ? i.quantity : 1) + " \u00d7" }),
        el("td", { text: i.item_name || i.item_id }),
        el("td", { class: "num", text: price }));
    })));
    var total = sc.value_minor != null ? fmtMinor(sc.value_minor, cur) : null;
    append(box, el("div", { class: "kv-row total" }, el("span", { text: (sc.item_count != null ? sc.item_count : items.length) + " items" }),
      el("strong", { testid: "panel-cart-value", text: total || "" })));
  }

  function renderEvents(events) {
    var list = byTestId("panel-events");
    list.textContent = "";
    byTestId("panel-event-count").textContent = events.length ? String(events.length) : "";
    if (!events.length) {
      append(list, el("li", { class: "muted", text: "No events stored yet." }));
      return;
    }
    events.slice(0, 50).forEach(function (e) {
      var name = e.name || e.event || "?";
      var id = e.event_id || "";
      var details = el("details", { open: !!openEvents[id] },
        el("summary", null,
          el("span", { class: "ev-name ev-" + name.replace(/[^a-z_]/gi, ""), text: name }),
          el("span", { class: "ev-time", text: clock(e.time_ms || e.received_ms || e.time) }),
          el("span", { class: "ev-facts", text: eventFacts(e).join(" \u00b7 ") }),
          Array.isArray(e.loaded) && e.loaded.length
            ? el("span", { class: "ev-loaded", text: "browser: " + e.loaded.join(", ") }) : null),
        el("pre", { text: pretty(e) }));
      details.addEventListener("toggle", function () {
        if (details.open) openEvents[id] = true; else delete openEvents[id];
      });
      append(list, el("li", { testid: "panel-event", "data-event": name, "data-event-id": id }, details));
    });
  }

  var DELIVERY_STATES = {
    held: "held for email", pending: "queued", delivered: "delivered", dead: "dead (kept)",
    browser: "in browser", expired: "expired", ignored: "not sent (a browser's claim)"
  };
  function requestKind(d) {
    // dedup keys read "orders/create:1001", "convert:1001", "event:<uuid>": the part before ":"
    var k = typeof d.dedup_key === "string" ? d.dedup_key.split(":")[0] : "";
    return k && k !== d.name && k !== "event" ? k : "";
  }
  function renderDeliveries(rows) {
    var list = byTestId("panel-deliveries");
    list.textContent = "";
    byTestId("panel-delivery-count").textContent = rows.length ? String(rows.length) : "";
    if (!rows.length) {
      append(list, el("li", { class: "muted", text: "Nothing to forward yet: most events reach vendors once the visitor has an email." }));
      return;
    }
    rows.slice(0, 30).forEach(function (d) {
      var state = String(d.state || "?");
      append(list, el("li", { testid: "panel-delivery", "data-vendor": d.vendor, "data-state": state,
                              "data-event": d.name, title: d.last_error || d.dedup_key || "" },
        el("span", { class: "dl-vendor", text: d.vendor }),
        el("span", { class: "dl-event" }, d.name || "",
          requestKind(d) ? el("span", { class: "dl-kind", text: " \u2192 " + requestKind(d) }) : null),
        el("span", { class: "dl-state dl-" + state.replace(/[^a-z]/gi, ""),
                     title: state === "ignored" && d.last_error ? d.last_error : null,
                     text: (DELIVERY_STATES[state] || state) + (d.attempts > 1 ? " \u00b7 " + d.attempts + " tries" : "") })));
    });
  }

  function pollSession() {
    if (sessionInFlight || document.hidden) return;
    sessionInFlight = true;
    fetch("/demo/session", { credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" } })
      .then(function (res) {
        if (!res.ok) throw new Error("HTTP " + res.status);
        return res.text();
      })
      .then(function (text) {
        var data = JSON.parse(text);
        setStatus("Live \u00b7 updated " + clock(Date.now()), "ok");
        if (text === lastSessionText) return;
        lastSessionText = text;
        byTestId("panel-sc").textContent = data.sc ? "sc " + String(data.sc).slice(0, 8) + "\u2026" : "no sc cookie yet";
        byTestId("panel-sc").title = data.sc || "";
        renderIdentity(data.identity);
        renderCart(data.cart);
        renderEvents(Array.isArray(data.events) ? data.events : []);
        renderDeliveries(Array.isArray(data.deliveries) ? data.deliveries : []);
      })
      .catch(function (err) {
        setStatus("onetag's /demo/session is not answering (" + (err && err.message ? err.message : "error") +
          "); retrying. The vendor calls below are live regardless.", "warn");
      })
      .then(function () { sessionInFlight = false; });
  }

  // Vendor queues, as the browser adapters left them for the (stub) libraries.
  var VENDORS = [
    { key: "rejoiner", label: "Rejoiner", global: "_rejoiner",
      queue: function () { return window._rejoiner; },
      call: function (c) { c = toArray(c); return { name: String(c[0]), args: c.slice(1) }; } },
    { key: "remarkety", label: "Remarkety", global: "_rmData",
      queue: function () { return window._rmData; },
      call: function (c) {
        c = toArray(c);
        return c[0] === "track" ? { name: "track " + c[1], args: c.slice(2) } : { name: String(c[0]), args: c.slice(1) };
      } },
    { key: "esputnik", label: "eSputnik", global: "eS.q",
      queue: function () { return window.eS && window.eS.q; },
      call: function (c) {
        // the loader queues f.c(arguments): each entry wraps the eS(...) call's own arguments
        c = toArray(c);
        if (c.length === 1 && c[0] && typeof c[0] === "object" && typeof c[0].length === "number") c = toArray(c[0]);
        return c[0] === "sendEvent" ? { name: "sendEvent " + c[1], args: c.slice(2) } : { name: String(c[0]), args: c.slice(1) };
      } },
    { key: "sendlane", label: "Sendlane", global: "_Sendlane",
      queue: function () { return window._Sendlane; },
      call: function (c) {
        if (c && typeof c === "object" && !Array.isArray(c)) {
          var rest = {};
          for (var k in c) if (k !== "event") rest[k] = c[k];
          return { name: c.event ? String(c.event) : c.form_key ? "form" : "call", args: [rest] };
        }
        c = toArray(c);
        return { name: String(c[0]), args: c.slice(1) };
      } }
  ];
  function toArray(c) {
    if (Array.isArray(c)) return c;
    if (c && typeof c === "object" && typeof c.length === "number") return Array.prototype.slice.call(c);
    return [c];
  }

  var vendorBoxes = {};
  var vendorSeen = {};
  var SHOW_CALLS = 6;

  function buildVendors() {
    var wrap = byTestId("panel-vendors");
    VENDORS.forEach(function (v) {
      var box = el("div", { class: "vendor", testid: "panel-vendor-" + v.key },
        el("div", { class: "vendor-head" },
          el("strong", { text: v.label }),
          el("code", { class: "muted", text: "window." + v.global }),
          el("span", { class: "badge", testid: "panel-vendor-" + v.key + "-status" })),
        el("ol", { class: "call-list", testid: "panel-vendor-" + v.key + "-calls" }));
      vendorBoxes[v.key] = box;
      wrap.appendChild(box);
    });
  }

  function callItem(name, args, testid) {
    var argText = args.length ? args.map(function (a) { return short(a, 90); }).join(", ") : "";
    return el("li", { testid: testid, "data-call": name },
      el("details", null,
        el("summary", null, el("span", { class: "call-name", text: name }), el("span", { class: "call-args", text: argText })),
        el("pre", { text: pretty(args.length === 1 ? args[0] : args) })));
  }

  function renderVendors() {
    var stubs = window.__onetagDemoStubs || {};
    VENDORS.forEach(function (v) {
      var box = vendorBoxes[v.key];
      var q;
      try { q = v.queue(); } catch (e) { q = undefined; }
      var isQueue = q && typeof q === "object" && typeof q.length === "number";
      var status = byTestId("panel-vendor-" + v.key + "-status", box);
      var state = !q ? "not enabled" : stubs[v.key] ? "library loaded" : "loading\u2026";
      status.textContent = state + (isQueue ? " \u00b7 " + q.length + " call" + (q.length === 1 ? "" : "s") : "");
      status.className = "badge" + (stubs[v.key] ? " badge-ok" : q ? "" : " badge-muted");
      box.classList.toggle("vendor-off", !q);

      var sig = isQueue ? q.length + ":" + (q.length ? short(q[q.length - 1], 200) : "") : String(!!q);
      if (vendorSeen[v.key] === sig) return;
      vendorSeen[v.key] = sig;
      var list = byTestId("panel-vendor-" + v.key + "-calls", box);
      list.textContent = "";
      if (!q) { append(list, el("li", { class: "muted", text: "No queue: this vendor is not enabled for the site, or onetag has not loaded." })); return; }
      if (!isQueue) { append(list, el("li", { class: "muted", text: "The queue was taken over by the vendor's real library." })); return; }
      if (!q.length) { append(list, el("li", { class: "muted", text: "No calls yet." })); return; }
      var calls = Array.prototype.slice.call(q, -SHOW_CALLS).reverse();
      calls.forEach(function (c) {
        var d;
        try { d = v.call(c); } catch (e) { d = { name: "?", args: [c] }; }
        append(list, callItem(d.name, d.args, "panel-vendor-call"));
      });
      if (q.length > SHOW_CALLS) append(list, el("li", { class: "muted more", text: (q.length - SHOW_CALLS) + " earlier calls" }));
    });
  }

  var dataLayerSeen = -1;
  function renderDataLayer() {
    var pushes = [];
    for (var i = 0; i < dataLayer.length; i++) {
      var d = dataLayer[i];
      if (d && typeof d === "object" && !Array.isArray(d) && typeof d.length !== "number" && d.event) pushes.push(d);
    }
    if (pushes.length === dataLayerSeen) return;
    dataLayerSeen = pushes.length;
    byTestId("panel-datalayer-count").textContent = pushes.length ? String(pushes.length) : "";
    var list = byTestId("panel-datalayer");
    list.textContent = "";
    if (!pushes.length) { append(list, el("li", { class: "muted", text: "Nothing pushed yet." })); return; }
    pushes.slice(-SHOW_CALLS).reverse().forEach(function (d) {
      var rest = {};
      for (var k in d) if (k !== "event" && k.charAt(0) !== "_" && k !== "gtm.uniqueEventId") rest[k] = d[k];
      append(list, callItem(String(d.event), Object.keys(rest).length ? [rest] : [], "panel-datalayer-push"));
    });
  }

  var soonTimer = null;
  function panelDataLayerSoon() {
    // let onetag's adapters run first, then show what they queued
    clearTimeout(soonTimer);
    soonTimer = setTimeout(function () { renderDataLayer(); renderVendors(); }, 60);
  }

  // ---------------------------------------------------------------- start

  updateCartCount();
  showSignedIn(load("email", ""));
  buildVendors();
  setPanel(load("panel-open", true) !== false);
  show(new URL(location.href), "none");
  renderDataLayer();
  renderVendors();
  pollSession();
  setInterval(pollSession, 1500);
  setInterval(function () { renderVendors(); renderDataLayer(); }, 700);
  document.addEventListener("visibilitychange", function () { if (!document.hidden) pollSession(); });
})();
