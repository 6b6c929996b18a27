// What the TLS layer (PortcullisEngine/TLS) needs from the system OpenSSL that Swift cannot
// call directly: OpenSSL's function-like macros, and the callbacks whose answers are fixed
// (verification that lets the handshake finish so the session decides, as nginx; ALPN
// selection from a configured list). Marshalling only: what to do is decided in Swift.
// See docs/decisions/0013-tls-library.md.
#ifndef CPORTCULLIS_TLS_H
#define CPORTCULLIS_TLS_H

#include <openssl/ssl.h>
#include <openssl/err.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <stddef.h>
#include <stdint.h>

/// Protocol bits, as `ssl_protocols` lists them.
#define PORTCULLIS_TLS_SSLv3   0x02
#define PORTCULLIS_TLS_TLSv1   0x04
#define PORTCULLIS_TLS_TLSv1_1 0x08
#define PORTCULLIS_TLS_TLSv1_2 0x10
#define PORTCULLIS_TLS_TLSv1_3 0x20

/// A new context (server or client) with nginx's fixed choices: no renegotiation, no
/// compression, partial writes, writes that may be retried from a moved buffer, buffers
/// released when idle. `protocols`: PORTCULLIS_TLS_* bits; the others are disabled.
SSL_CTX *portcullis_tls_context_new(int server, unsigned protocols);

/// The context's error queue as one line (OpenSSL's "error:…:reason" texts joined by ":"),
/// emptied. Returns the length written (0: none).
size_t portcullis_tls_errors(char *buffer, size_t size);

/// ssl_session_tickets off and ssl_prefer_server_ciphers on, as option bits.
void portcullis_tls_server_options(SSL_CTX *ctx, int session_tickets, int prefer_server_ciphers);

/// ssl_conf_command NAME VALUE (OpenSSL's SSL_CONF, as nginx passes them); 1 on success.
int portcullis_tls_conf_command(SSL_CTX *ctx, int server, const char *name, const char *value);

/// ssl_ecdh_curve (a list, e.g. "X25519:prime256v1"); 1 on success.
int portcullis_tls_set_groups(SSL_CTX *ctx, const char *groups);

/// ssl_session_cache: mode 0 off, 1 none (nginx: says sessions may be resumed, keeps one),
/// 2 builtin with `size` entries; `timeout` seconds; the session id context names the server.
void portcullis_tls_set_session_cache(SSL_CTX *ctx, int mode, long size, long timeout,
                                      const unsigned char *id_context, unsigned id_length);

/// ssl_verify_client: 0 off, 1 on, 2 optional, 3 optional_no_ca. The handshake always
/// finishes (the callback accepts); the session checks the result, as nginx.
void portcullis_tls_set_verify_client(SSL_CTX *ctx, int mode, int depth);

/// proxy_ssl_verify: verify the upstream's chain, and its name when `name` is not NULL.
void portcullis_tls_set_verify_peer(SSL *ssl, int depth, const char *name);

/// ssl_alpn: `wire` is the protocol list in wire format (length-prefixed names). A client
/// that offers ALPN and shares none fails the handshake (no_application_protocol), as nginx.
/// The context keeps its own copy.
int portcullis_tls_set_alpn_protocols(SSL_CTX *ctx, const unsigned char *wire, unsigned length);

/// proxy_ssl_server_name: the SNI to send.
int portcullis_tls_set_server_name(SSL *ssl, const char *name);

/// A connection's app pointer (the Swift stream), for the callbacks.
void portcullis_tls_set_app_data(SSL *ssl, void *data);
void *portcullis_tls_get_app_data(const SSL *ssl);

/// The cipher's name, or "".
const char *portcullis_tls_cipher_name(const SSL *ssl);

/// Whether the client presented a certificate, and its subject as RFC 2253 text (nginx's
/// $ssl_client_s_dn) and common name; 0 if none. Texts are cut to the buffers.
int portcullis_tls_peer_subject(const SSL *ssl, char *dn, size_t dn_size, char *cn, size_t cn_size);

/// The local certificate's signature algorithm ("ecdsa-with-SHA256", OpenSSL's short name) and key
/// algorithm with bits ("RSA2048", "EC256"), for the PROXY v2 SSL sub-TLVs (HAProxy's words).
void portcullis_tls_local_algorithms(const SSL *ssl, char *sig, size_t sig_size, char *key, size_t key_size);

/// Client sessions for proxy_ssl_session_reuse: the callback receives each new session
/// (TLS 1.3 tickets come after the handshake); it returns 1 to keep the reference.
void portcullis_tls_set_new_session_callback(SSL_CTX *ctx, int (*callback)(SSL *, SSL_SESSION *));

#endif
