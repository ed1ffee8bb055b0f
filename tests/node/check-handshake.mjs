// Clerk's own @clerk/backend judges the stand-in's handshake (run by tests/test_standin_handshake.py).
//
// Reads one JSON object on stdin:
//   {pem, secretKey, apiUrl, appUrl, productionKey, developmentKey,
//    sessionToken, cookiePayload, queryPayload, nonce, badPayload}
// and prints one JSON object of what the package concluded for each case. Keys are verified with `jwtKey`
// (the stand-in's public PEM), so no JWKS is fetched; only the nonce case calls the stand-in's Backend API
// (`apiUrl`, on loopback), as the package does for `__clerk_handshake_nonce`.
import { createClerkClient, verifyToken } from '@clerk/backend';

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const input = JSON.parse(Buffer.concat(chunks).toString('utf8'));

// A page navigation, the only kind of request the package resolves a handshake for.
const page = (url, cookie) =>
  new Request(url, {
    headers: { accept: 'text/html', 'sec-fetch-dest': 'document', ...(cookie ? { cookie } : {}) },
  });

const summary = state => ({
  status: state.status,
  reason: state.reason ?? null,
  token: state.token ?? null,
  sessionId: state.toAuth?.()?.sessionId ?? null,
  setCookie: state.headers?.getSetCookie?.() ?? [],
  location: state.headers?.get('location') ?? null,
});

const client = publishableKey =>
  createClerkClient({
    secretKey: input.secretKey,
    publishableKey,
    jwtKey: input.pem,
    apiUrl: input.apiUrl,
    telemetry: { disabled: true }, // no network but the stand-in's
  });

const result = {};

// (a) a session token minted by the handshake is a valid Clerk session token
const verified = await verifyToken(input.sessionToken, { jwtKey: input.pem });
result.verifyToken = { sid: verified.sid ?? null, sub: verified.sub ?? null };

// (b) production: the payload arrives as the __clerk_handshake cookie
const production = client(input.productionKey);
result.cookie = summary(
  await production.authenticateRequest(page(input.appUrl, `__clerk_handshake=${input.cookiePayload}`)),
);

// (c) development: the payload arrives in the query, and the package redirects to the URL without it
const development = client(input.developmentKey);
const withQuery = new URL(input.appUrl);
withQuery.searchParams.set('__clerk_handshake', input.queryPayload);
result.query = summary(await development.authenticateRequest(page(withQuery.href)));

// (d) a nonce, exchanged for the directives through the stand-in's Backend API
result.nonce = summary(
  await production.authenticateRequest(page(input.appUrl, `__clerk_handshake_nonce=${input.nonce}`)),
);

// (e) a payload signed by a key that is not the instance's is not believed
const originalError = console.error;
console.error = () => {}; // the package logs the refused handshake; the result says enough
result.badSignature = summary(
  await production.authenticateRequest(page(input.appUrl, `__clerk_handshake=${input.badPayload}`)),
);
console.error = originalError;

process.stdout.write(JSON.stringify(result));
