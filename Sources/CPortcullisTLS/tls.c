#include "CPortcullisTLS.h"
#include <stdlib.h>
#include <string.h>

SSL_CTX *portcullis_tls_context_new(int server, unsigned protocols) {
    SSL_CTX *ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    if (ctx == NULL) return NULL;
    // nginx lists protocols and turns the others off; the library's own floor stays.
    SSL_CTX_set_min_proto_version(ctx, 0);
    SSL_CTX_set_max_proto_version(ctx, 0);
    // A peer that closes without close_notify reads as EOF, as nginx takes it.
    uint64_t off = SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_SSLv2 | SSL_OP_IGNORE_UNEXPECTED_EOF;
    if (!(protocols & PORTCULLIS_TLS_SSLv3)) off |= SSL_OP_NO_SSLv3;
    if (!(protocols & PORTCULLIS_TLS_TLSv1)) off |= SSL_OP_NO_TLSv1;
    if (!(protocols & PORTCULLIS_TLS_TLSv1_1)) off |= SSL_OP_NO_TLSv1_1;
    if (!(protocols & PORTCULLIS_TLS_TLSv1_2)) off |= SSL_OP_NO_TLSv1_2;
    if (!(protocols & PORTCULLIS_TLS_TLSv1_3)) off |= SSL_OP_NO_TLSv1_3;
    SSL_CTX_set_options(ctx, off);
    // NO_AUTO_CHAIN: the chain is the certificate file's; without it OpenSSL may search the
    // verify store for one on every handshake. Read-ahead: one read takes what the socket
    // has, not 5 bytes then a record (nginx sets both; the relay reads until OpenSSL says
    // "want read", so nothing it buffered is left behind without an edge).
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
                     | SSL_MODE_RELEASE_BUFFERS | SSL_MODE_NO_AUTO_CHAIN);
    SSL_CTX_set_read_ahead(ctx, 1);
    return ctx;
}

size_t portcullis_tls_errors(char *buffer, size_t size) {
    size_t used = 0;
    unsigned long code;
    if (size == 0) return 0;
    buffer[0] = 0;
    while ((code = ERR_get_error()) != 0) {
        char one[256];
        ERR_error_string_n(code, one, sizeof one);
        size_t length = strlen(one);
        if (used + length + 2 >= size) continue;  // keep emptying the queue
        if (used > 0) buffer[used++] = ' ';
        memcpy(buffer + used, one, length);
        used += length;
        buffer[used] = 0;
    }
    return used;
}

void portcullis_tls_server_options(SSL_CTX *ctx, int session_tickets, int prefer_server_ciphers) {
    if (!session_tickets) SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
    if (prefer_server_ciphers) SSL_CTX_set_options(ctx, SSL_OP_CIPHER_SERVER_PREFERENCE);
}

int portcullis_tls_conf_command(SSL_CTX *ctx, int server, const char *name, const char *value) {
    SSL_CONF_CTX *cctx = SSL_CONF_CTX_new();
    if (cctx == NULL) return 0;
    SSL_CONF_CTX_set_flags(cctx, SSL_CONF_FLAG_FILE | SSL_CONF_FLAG_CERTIFICATE | SSL_CONF_FLAG_SHOW_ERRORS
                           | (server ? SSL_CONF_FLAG_SERVER : SSL_CONF_FLAG_CLIENT));
    SSL_CONF_CTX_set_ssl_ctx(cctx, ctx);
    int ok = SSL_CONF_cmd(cctx, name, value) == 2;
    SSL_CONF_CTX_free(cctx);
    return ok;
}

int portcullis_tls_set_groups(SSL_CTX *ctx, const char *groups) {
    return (int)SSL_CTX_set1_groups_list(ctx, groups);
}

void portcullis_tls_set_session_cache(SSL_CTX *ctx, int mode, long size, long timeout,
                                      const unsigned char *id_context, unsigned id_length) {
    SSL_CTX_set_session_id_context(ctx, id_context, id_length);
    SSL_CTX_set_timeout(ctx, timeout);
    switch (mode) {
    case 0:
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
        break;
    case 1:
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_SERVER | SSL_SESS_CACHE_NO_AUTO_CLEAR
                                       | SSL_SESS_CACHE_NO_INTERNAL_STORE);
        SSL_CTX_sess_set_cache_size(ctx, 1);
        break;
    default:
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_SERVER);
        if (size > 0) SSL_CTX_sess_set_cache_size(ctx, size);
        break;
    }
}

// Accept whatever the chain is: the session reads SSL_get_verify_result and decides (nginx's
// ngx_ssl_verify_callback does the same).
static int accept_any(int ok, X509_STORE_CTX *store) {
    (void)ok;
    (void)store;
    return 1;
}

void portcullis_tls_set_verify_client(SSL_CTX *ctx, int mode, int depth) {
    if (mode == 0) {
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
        return;
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, accept_any);
    SSL_CTX_set_verify_depth(ctx, depth);
}

void portcullis_tls_set_verify_peer(SSL *ssl, int depth, const char *name) {
    SSL_set_verify(ssl, SSL_VERIFY_PEER, accept_any);
    SSL_set_verify_depth(ssl, depth);
    if (name != NULL) {
        X509_VERIFY_PARAM *param = SSL_get0_param(ssl);
        X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
        X509_VERIFY_PARAM_set1_host(param, name, 0);
    }
}

struct alpn_list {
    unsigned length;
    unsigned char wire[];
};

static int alpn_index = -1;

static void alpn_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp) {
    (void)parent; (void)ad; (void)idx; (void)argl; (void)argp;
    free(ptr);
}

static int select_alpn(SSL *ssl, const unsigned char **out, unsigned char *out_length,
                       const unsigned char *in, unsigned in_length, void *arg) {
    (void)ssl;
    struct alpn_list *list = arg;
    if (SSL_select_next_proto((unsigned char **)out, out_length, list->wire, list->length, in, in_length)
        != OPENSSL_NPN_NEGOTIATED) {
        return SSL_TLSEXT_ERR_ALERT_FATAL;
    }
    return SSL_TLSEXT_ERR_OK;
}

int portcullis_tls_set_alpn_protocols(SSL_CTX *ctx, const unsigned char *wire, unsigned length) {
    if (alpn_index < 0) {
        alpn_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, alpn_free);
        if (alpn_index < 0) return 0;
    }
    struct alpn_list *list = malloc(sizeof *list + length);
    if (list == NULL) return 0;
    list->length = length;
    memcpy(list->wire, wire, length);
    if (!SSL_CTX_set_ex_data(ctx, alpn_index, list)) {
        free(list);
        return 0;
    }
    SSL_CTX_set_alpn_select_cb(ctx, select_alpn, list);
    return 1;
}

int portcullis_tls_set_server_name(SSL *ssl, const char *name) {
    return (int)SSL_set_tlsext_host_name(ssl, name);
}

void portcullis_tls_set_app_data(SSL *ssl, void *data) { SSL_set_app_data(ssl, data); }

void *portcullis_tls_get_app_data(const SSL *ssl) { return SSL_get_app_data(ssl); }

const char *portcullis_tls_cipher_name(const SSL *ssl) {
    const char *name = SSL_get_cipher_name(ssl);  // "(NONE)" before one is chosen, as nginx logs
    return name != NULL ? name : "";
}

static void copy_bio(BIO *bio, char *out, size_t size) {
    char *data = NULL;
    long length = BIO_get_mem_data(bio, &data);
    if (size == 0) return;
    if (length < 0) length = 0;
    if ((size_t)length >= size) length = (long)size - 1;
    if (length > 0) memcpy(out, data, (size_t)length);
    out[length] = 0;
}

int portcullis_tls_peer_subject(const SSL *ssl, char *dn, size_t dn_size, char *cn, size_t cn_size) {
    if (dn_size) dn[0] = 0;
    if (cn_size) cn[0] = 0;
    X509 *cert = SSL_get1_peer_certificate(ssl);
    if (cert == NULL) return 0;
    X509_NAME *name = X509_get_subject_name(cert);
    BIO *bio = BIO_new(BIO_s_mem());
    if (bio != NULL && name != NULL) {
        X509_NAME_print_ex(bio, name, 0, XN_FLAG_RFC2253);
        copy_bio(bio, dn, dn_size);
    }
    BIO_free(bio);
    if (name != NULL && cn_size > 0) {
        int index = X509_NAME_get_index_by_NID(name, NID_commonName, -1);
        if (index >= 0) {
            ASN1_STRING *value = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, index));
            unsigned char *utf8 = NULL;
            int length = ASN1_STRING_to_UTF8(&utf8, value);
            if (length > 0) {
                size_t n = (size_t)length < cn_size - 1 ? (size_t)length : cn_size - 1;
                memcpy(cn, utf8, n);
                cn[n] = 0;
            }
            OPENSSL_free(utf8);
        }
    }
    X509_free(cert);
    return 1;
}

void portcullis_tls_local_algorithms(const SSL *ssl, char *sig, size_t sig_size, char *key, size_t key_size) {
    if (sig_size) sig[0] = 0;
    if (key_size) key[0] = 0;
    X509 *cert = SSL_get_certificate(ssl);
    if (cert == NULL) return;
    // HAProxy's words: the signature algorithm's short name ("ecdsa-with-SHA256").
    const char *name = OBJ_nid2sn(X509_get_signature_nid(cert));
    if (name != NULL && sig_size) snprintf(sig, sig_size, "%s", name);
    EVP_PKEY *pkey = X509_get0_pubkey(cert);
    if (pkey != NULL && key_size) {
        const char *kind = EVP_PKEY_get_base_id(pkey) == EVP_PKEY_RSA ? "RSA"
                         : EVP_PKEY_get_base_id(pkey) == EVP_PKEY_EC ? "EC"
                         : OBJ_nid2sn(EVP_PKEY_get_base_id(pkey));
        snprintf(key, key_size, "%s%d", kind != NULL ? kind : "", EVP_PKEY_get_bits(pkey));
    }
}

void portcullis_tls_set_new_session_callback(SSL_CTX *ctx, int (*callback)(SSL *, SSL_SESSION *)) {
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL);
    SSL_CTX_sess_set_new_cb(ctx, callback);
}
