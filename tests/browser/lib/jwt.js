// HS256 JSON Web Tokens (RFC 7519, compact form) minted in Node for the tests, and the check
// whether a server binary verifies them (`--auth-key-file`, issue 9).
import { execFileSync } from 'node:child_process';
import { createHmac } from 'node:crypto';

const b64url = (buf) => Buffer.from(buf).toString('base64url');

/** An HS256 JWT signed with `secret` (the bytes of a key file); `kid` names the key file. */
export function mintHs256(secret, claims, kid) {
  const header = { alg: 'HS256', typ: 'JWT', ...(kid ? { kid } : {}) };
  const signingInput = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(claims))}`;
  const sig = createHmac('sha256', secret).update(signingInput).digest();
  return `${signingInput}.${b64url(sig)}`;
}

/** Whether the server binary at `bin` has the `--auth-key-file` flag (from its `--help`). */
export function supportsAuthKeys(bin) {
  return execFileSync(bin, ['--help'], { encoding: 'utf8' }).includes('--auth-key-file');
}
