// Send one message with nodemailer; used by tests/e2e/test_submission.py.
//
//   node send.js '{"host": "127.0.0.1", "port": 587, "secure": false, "user": "...",
//                  "pass": "...", "ca": "/path/cert.pem", "servername": "mail.example.test",
//                  "from": "...", "to": "...", "subject": "...", "text": "..."}'
//
// Prints one JSON line: {"ok": true, "response": "250 ..."} or
// {"ok": false, "code": "EAUTH", "responseCode": 535, "response": "..."}; exit 0 either way
// (the test decides), 2 for bad arguments.
"use strict";

const fs = require("fs");
const nodemailer = require("nodemailer");

async function main() {
  let options;
  try {
    options = JSON.parse(process.argv[2]);
  } catch (err) {
    console.error("usage: node send.js '<json options>'");
    process.exit(2);
  }
  const transport = nodemailer.createTransport({
    host: options.host,
    port: options.port,
    secure: options.secure,
    requireTLS: !options.secure,           // STARTTLS or fail, never plaintext AUTH
    auth: { user: options.user, pass: options.pass },
    tls: {
      ca: [fs.readFileSync(options.ca)],   // trust the test certificate, verify it
      servername: options.servername,
      rejectUnauthorized: true,
    },
    connectionTimeout: 15000,
    greetingTimeout: 15000,
    socketTimeout: 15000,
  });
  try {
    const info = await transport.sendMail({
      from: options.from,
      to: options.to,
      subject: options.subject,
      text: options.text,
    });
    console.log(JSON.stringify({ ok: true, response: info.response, messageId: info.messageId }));
  } catch (err) {
    console.log(JSON.stringify({
      ok: false, code: err.code || "", responseCode: err.responseCode || 0,
      response: err.response || String(err.message || err),
    }));
  } finally {
    transport.close();
  }
}

main();
