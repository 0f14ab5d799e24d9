//! Every refusal of [`Auth`], one check per rule.

use std::path::PathBuf;

use super::mint::{ed25519_pem_pair, MintClaims, MintKey};
use super::*;

const NOW: u64 = 1_700_000_000;
const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef\n";

struct Fixture {
    dir: PathBuf,
    hs: MintKey,
    ed: MintKey,
    ed_public_pem: String,
}

fn fixture(name: &str) -> Fixture {
    let dir = std::env::temp_dir().join(format!("collab-auth-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (private, public) = ed25519_pem_pair(&[7; 32]);
    std::fs::write(dir.join("hs.key"), SECRET).expect("write");
    std::fs::write(dir.join("ed.pem"), &public).expect("write");
    Fixture {
        hs: MintKey::hs256(SECRET).expect("hs key"),
        ed: MintKey::ed25519_pem(private.as_bytes()).expect("ed key"),
        ed_public_pem: public,
        dir,
    }
}

impl Fixture {
    fn auth(&self) -> Arc<Auth> {
        Auth::open(
            &[self.dir.join("hs.key"), self.dir.join("ed.pem")],
            Some(self.dir.clone()),
        )
        .expect("open")
        .expect("keys given")
    }
}

fn claims(doc: &str, role: Role) -> MintClaims {
    MintClaims::new("alice", doc, role, NOW, 3600)
}

fn b64(bytes: &[u8]) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    URL_SAFE_NO_PAD.encode(bytes)
}

fn check(auth: &Auth, token: &str, doc: &str, expected: Result<(), AuthError>) {
    let got = auth.authorize(Some(token), doc, NOW).map(|_| ());
    assert_eq!(got, expected, "token {token:.60}");
}

#[test]
fn both_algorithms_verify_and_grant() {
    let f = fixture("ok");
    let auth = f.auth();
    for key in [&f.hs, &f.ed] {
        let mut c = claims("team-7/*", Role::Read);
        c.name = Some("Alice".into());
        c.jti = Some("j".into());
        let token = key.sign(&c, None).expect("sign");
        let grant = auth.authorize(Some(&token), "team-7/a", NOW).expect("ok");
        assert_eq!(grant.user, "alice");
        assert_eq!(grant.name.as_deref(), Some("Alice"));
        assert_eq!(grant.role, Role::Read);
        assert_eq!(grant.exp, NOW + 3600);
        assert_eq!(grant.jti.as_deref(), Some("j"));
    }
    // kid naming the right key works; naming the other kind's key does not.
    let token =
        f.hs.sign(&claims("d", Role::Write), Some("hs"))
            .expect("sign");
    check(&auth, &token, "d", Ok(()));
    let token =
        f.hs.sign(&claims("d", Role::Write), Some("ed"))
            .expect("sign");
    check(&auth, &token, "d", Err(AuthError::UnknownKey));
    let token =
        f.hs.sign(&claims("d", Role::Write), Some("nope"))
            .expect("sign");
    check(&auth, &token, "d", Err(AuthError::UnknownKey));
}

#[test]
fn every_refusal() {
    let f = fixture("refusals");
    let auth = f.auth();
    assert_eq!(auth.authorize(None, "d", NOW), Err(AuthError::Missing));
    check(&auth, "garbage", "d", Err(AuthError::Malformed));
    check(&auth, "a.b.c", "d", Err(AuthError::Malformed));
    check(&auth, "", "d", Err(AuthError::Malformed));
    let big = "a".repeat(TOKEN_BYTES_MAX + 1);
    check(&auth, &big, "d", Err(AuthError::TooLarge));

    // Bad signature: signed with another secret.
    let other = MintKey::hs256(b"another secret of at least 32 bytes!").expect("key");
    let token = other.sign(&claims("d", Role::Write), None).expect("sign");
    check(&auth, &token, "d", Err(AuthError::BadSignature));
    // A flipped payload with the original signature.
    let good = f.hs.sign(&claims("d", Role::Read), None).expect("sign");
    let parts: Vec<&str> = good.split('.').collect();
    let forged_payload = b64(br#"{"sub":"alice","exp":1800000000,"doc":"*","role":"admin"}"#);
    let forged = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
    check(&auth, &forged, "d", Err(AuthError::BadSignature));

    // alg none, with or without a signature part.
    let payload = b64(br#"{"sub":"alice","exp":1800000000,"doc":"*","role":"admin"}"#);
    for header in [r#"{"alg":"none","typ":"JWT"}"#, r#"{"alg":"None"}"#] {
        let token = format!("{}.{}.", b64(header.as_bytes()), payload);
        check(&auth, &token, "d", Err(AuthError::AlgNone));
    }
    // Other algorithms.
    for alg in ["HS512", "RS256", "ES256", "PS256", "HS384"] {
        let header = format!(r#"{{"alg":"{alg}"}}"#);
        let token = format!("{}.{}.c2ln", b64(header.as_bytes()), payload);
        check(&auth, &token, "d", Err(AuthError::Algorithm));
    }

    // Algorithm confusion: HS256 signed with the public key's PEM bytes as the secret.
    let confused = MintKey::hs256(f.ed_public_pem.as_bytes()).expect("pem as secret");
    let token = confused
        .sign(&claims("d", Role::Admin), None)
        .expect("sign");
    check(&auth, &token, "d", Err(AuthError::BadSignature));
    let token = confused
        .sign(&claims("d", Role::Admin), Some("ed"))
        .expect("sign");
    check(&auth, &token, "d", Err(AuthError::UnknownKey));
    // And against a server that has only the public key: no HMAC key exists at all.
    let ed_only = Auth::open(&[f.dir.join("ed.pem")], None)
        .expect("open")
        .expect("keys");
    let token = confused
        .sign(&claims("d", Role::Admin), None)
        .expect("sign");
    check(&ed_only, &token, "d", Err(AuthError::UnknownKey));

    // Time rules.
    let mut c = claims("d", Role::Write);
    c.exp = NOW;
    check(
        &auth,
        &f.hs.sign(&c, None).expect("sign"),
        "d",
        Err(AuthError::Expired),
    );
    c.exp = NOW - 1;
    check(
        &auth,
        &f.ed.sign(&c, None).expect("sign"),
        "d",
        Err(AuthError::Expired),
    );
    let mut c = claims("d", Role::Write);
    c.iat = NOW + CLOCK_SKEW_SECS + 1;
    check(
        &auth,
        &f.hs.sign(&c, None).expect("sign"),
        "d",
        Err(AuthError::IssuedInFuture),
    );
    #[derive(serde::Serialize)]
    struct WithNbf {
        sub: &'static str,
        exp: u64,
        nbf: u64,
        doc: &'static str,
        role: &'static str,
    }
    let nbf = |nbf| WithNbf {
        sub: "alice",
        exp: NOW + 100,
        nbf,
        doc: "d",
        role: "write",
    };
    let token =
        f.hs.sign(&nbf(NOW + CLOCK_SKEW_SECS + 1), None)
            .expect("sign");
    check(&auth, &token, "d", Err(AuthError::NotYetValid));
    let token = f.hs.sign(&nbf(NOW + CLOCK_SKEW_SECS), None).expect("sign");
    check(&auth, &token, "d", Ok(()));

    // Scope.
    let token =
        f.hs.sign(&claims("team-7/*", Role::Write), None)
            .expect("sign");
    check(&auth, &token, "team-7/x", Ok(()));
    check(&auth, &token, "team-70", Err(AuthError::WrongDoc));
    check(&auth, &token, "team-7", Err(AuthError::WrongDoc));
    let token =
        f.hs.sign(&claims("team-7", Role::Write), None)
            .expect("sign");
    check(&auth, &token, "team-70", Err(AuthError::WrongDoc));

    // Missing and ill-typed claims.
    #[derive(serde::Serialize)]
    struct NoRole {
        sub: &'static str,
        exp: u64,
        doc: &'static str,
    }
    let token =
        f.hs.sign(
            &NoRole {
                sub: "a",
                exp: NOW + 9,
                doc: "d",
            },
            None,
        )
        .expect("sign");
    assert!(matches!(
        auth.authorize(Some(&token), "d", NOW),
        Err(AuthError::BadClaims(_))
    ));
    let mut c = claims("d", Role::Write);
    c.role = "owner";
    assert!(matches!(
        auth.authorize(Some(&f.hs.sign(&c, None).expect("sign")), "d", NOW),
        Err(AuthError::BadClaims(_))
    ));
}

#[test]
fn key_files_are_checked() {
    let f = fixture("files");
    let short = f.dir.join("short.key");
    std::fs::write(&short, b"0123456789abcdef0123456789abcde").expect("write");
    assert!(Auth::open(&[short], None).is_err());
    let private = f.dir.join("private.pem");
    std::fs::write(&private, ed25519_pem_pair(&[1; 32]).0).expect("write");
    assert!(
        Auth::open(&[private], None).is_err(),
        "a private key is not a server key"
    );
    let dup = f.dir.join("sub");
    std::fs::create_dir_all(&dup).expect("dir");
    std::fs::write(dup.join("hs.secret"), SECRET).expect("write");
    assert!(matches!(
        KeySet::load(&[f.dir.join("hs.key"), dup.join("hs.secret")]),
        Err(KeyError::DuplicateId { .. })
    ));
    assert!(Auth::open(&[f.dir.join("missing.key")], None).is_err());
    assert!(Auth::open(&[], None).expect("no keys").is_none());
    // The trailing newline is part of the secret: a token signed without it fails.
    let auth = f.auth();
    let trimmed = MintKey::hs256(SECRET.trim_ascii_end()).expect("key");
    let token = trimmed.sign(&claims("d", Role::Write), None).expect("sign");
    check(&auth, &token, "d", Err(AuthError::BadSignature));
}

#[test]
fn reload_swaps_keys_and_keeps_them_on_error() {
    let f = fixture("reload");
    let auth = f.auth();
    let token = f.hs.sign(&claims("d", Role::Write), None).expect("sign");
    check(&auth, &token, "d", Ok(()));
    let new_secret = b"a brand new secret of 32 bytes or more";
    std::fs::write(f.dir.join("hs.key"), new_secret).expect("write");
    auth.reload_keys().expect("reload");
    check(&auth, &token, "d", Err(AuthError::BadSignature));
    let new = MintKey::hs256(new_secret).expect("key");
    let token = new.sign(&claims("d", Role::Write), None).expect("sign");
    check(&auth, &token, "d", Ok(()));
    std::fs::write(f.dir.join("hs.key"), b"short").expect("write");
    assert!(auth.reload_keys().is_err());
    check(&auth, &token, "d", Ok(()));
}

#[test]
fn revocation_refuses_and_persists() {
    let f = fixture("revoke");
    let auth = f.auth();
    let mut c = claims("*", Role::Write);
    c.jti = Some("j1".into());
    c.iat = NOW - 10;
    let token = f.hs.sign(&c, None).expect("sign");
    check(&auth, &token, "d", Ok(()));
    let request = RevokeRequest {
        jti: Some("j1".into()),
        sub: None,
        doc: None,
    };
    auth.revoke(&request, NOW).expect("revoke");
    check(&auth, &token, "d", Err(AuthError::Revoked));
    let bad = RevokeRequest {
        jti: None,
        sub: None,
        doc: None,
    };
    assert!(matches!(auth.revoke(&bad, NOW), Err(Ok(_))));
    // A restart reads the list back.
    let again = f.auth();
    check(&again, &token, "d", Err(AuthError::Revoked));
    // Admin checks.
    assert_eq!(
        auth.authorize_admin(None, NOW).map(|_| ()),
        Err(AdminRefusal::Unauthorized(AuthError::Missing))
    );
    let writer = f.hs.sign(&claims("*", Role::Write), None).expect("sign");
    assert_eq!(
        auth.authorize_admin(Some(&writer), NOW).map(|_| ()),
        Err(AdminRefusal::Forbidden)
    );
    let narrow =
        f.hs.sign(&claims("team/*", Role::Admin), None)
            .expect("sign");
    assert_eq!(
        auth.authorize_admin(Some(&narrow), NOW).map(|_| ()),
        Err(AdminRefusal::Forbidden)
    );
    let admin = f.ed.sign(&claims("*", Role::Admin), None).expect("sign");
    assert!(auth.authorize_admin(Some(&admin), NOW).is_ok());
}

#[test]
fn tokens_from_several_places_must_agree() {
    assert_eq!(pick_token(&[None, None, None]), Ok(None));
    assert_eq!(pick_token(&[Some("a"), None, Some("a")]), Ok(Some("a")));
    assert_eq!(
        pick_token(&[Some("a"), Some("b"), None]),
        Err(AuthError::Conflict)
    );
}
