// The pages the links of our messages open. The token travels in the URL's fragment, which
// browsers never send to a server (nor in a Referer): this script reads it and calls the API.
// Confirming takes JavaScript, so link scanners that fetch the page do not use the token up.
"use strict";

(function () {
  const main = document.querySelector("main");
  const title = document.getElementById("title");
  const status = document.getElementById("status");
  const token = new URLSearchParams(window.location.hash.slice(1)).get("token") || "";
  // Drop the token from the address bar and the history.
  if (window.location.hash) {
    history.replaceState(null, "", window.location.pathname);
  }

  function show(text, ok) {
    status.textContent = text;
    status.className = ok ? "ok" : "error";
  }

  async function call(path, body) {
    const response = await fetch(path, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
      credentials: "omit",
      cache: "no-store",
    });
    const data = await response.json().catch(() => ({}));
    return { ok: response.ok, data: data };
  }

  function reason(data) {
    const details = (data.error && data.error.details) || [];
    const info = details.find((d) => d["@type"] === "type.googleapis.com/google.rpc.ErrorInfo");
    return info ? info.reason : "";
  }

  function failure(data, what) {
    switch (reason(data)) {
      case "EMAIL_TOKEN_EXPIRED":
        return "This link has expired. Ask for a new message.";
      case "EMAIL_TOKEN_USED":
        return "This link was used already.";
      case "EMAIL_TOKEN_INVALID":
        return "This link is not valid. Check that you opened the whole link from the message.";
      case "RATE_LIMITED":
        return "Too many attempts. Try again later.";
      default:
        return (data.error && data.error.message) || ("Could not " + what + ". Try again later.");
    }
  }

  async function verify() {
    if (!token) {
      title.textContent = "Confirm your email address";
      show("This page needs the link from the message.", false);
      return;
    }
    try {
      const result = await call("/v1/auth/verify-email", { token: token });
      if (result.ok) {
        title.textContent = "Email address confirmed";
        show("Thank you: " + result.data.user.email + " is confirmed. You can close this page.", true);
      } else {
        title.textContent = "Email address not confirmed";
        show(failure(result.data, "confirm the address"), false);
      }
    } catch (error) {
      show("Could not reach the service. Try again later.", false);
    }
  }

  function reset() {
    const form = document.getElementById("reset");
    if (!token) {
      show("This page needs the link from the message.", false);
      return;
    }
    form.hidden = false;
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const password = document.getElementById("password").value;
      if (password !== document.getElementById("confirm").value) {
        show("The two passwords differ.", false);
        return;
      }
      try {
        const result = await call("/v1/auth/password-reset:confirm", { token: token, newPassword: password });
        if (result.ok) {
          form.hidden = true;
          title.textContent = "Password changed";
          show("Your password is changed and every session was signed out. Log in with the new password.", true);
        } else {
          show(failure(result.data, "change the password"), false);
        }
      } catch (error) {
        show("Could not reach the service. Try again later.", false);
      }
    });
  }

  if (main.dataset.page === "verify-email") {
    verify();
  } else {
    reset();
  }
})();
