/* Checks Tests/Fixtures/regex/pcre2-vectors.tsv (or any file of its format) against PCRE2, the
 * library nginx matches map regexes with. Prints each line whose EXPECTED is not PCRE2's answer.
 * Build (the declarations below stand in for pcre2.h, so only the shared library is needed):
 *   cc -O2 bench/regex/pcre2-check.c -o /tmp/pcre2-check -l:libpcre2-8.so.0
 *   /tmp/pcre2-check < Tests/Fixtures/regex/pcre2-vectors.tsv
 * The subject is matched as bytes (no PCRE2_UTF, as nginx compiles), so keep vectors ASCII. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

typedef struct pcre2_real_code_8 pcre2_code;
typedef struct pcre2_real_match_data_8 pcre2_match_data;
extern pcre2_code *pcre2_compile_8(const unsigned char *, size_t, uint32_t, int *, size_t *, void *);
extern pcre2_match_data *pcre2_match_data_create_from_pattern_8(const pcre2_code *, void *);
extern int pcre2_match_8(const pcre2_code *, const unsigned char *, size_t, size_t, uint32_t, pcre2_match_data *, void *);
extern size_t *pcre2_get_ovector_pointer_8(pcre2_match_data *);
extern int pcre2_pattern_info_8(const pcre2_code *, uint32_t, void *);
#define CASELESS 0x00000008u
#define INFO_CAPTURECOUNT 4
#define ERROR_NOMATCH (-1)

static void unescape(char *s) {
    char *o = s;
    for (; *s; s++) {
        if (s[0] == '\\' && s[1] == 'n') { *o++ = '\n'; s++; } else { *o++ = *s; }
    }
    *o = 0;
}

static void append(char *out, size_t size, const char *text) { strncat(out, text, size - strlen(out) - 1); }

int main(void) {
    static char line[65536], answer[65536];
    long lines = 0, wrong = 0;
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        if (line[0] == '#' || line[0] == 0) continue;
        char *fields[4] = {line, 0, 0, 0};
        for (int i = 1; i < 4; i++) {
            char *tab = strchr(fields[i - 1], '\t');
            if (!tab) { fprintf(stderr, "malformed line: %s\n", line); return 2; }
            *tab = 0;
            fields[i] = tab + 1;
        }
        char subject[65536];
        snprintf(subject, sizeof subject, "%s", fields[2]);
        unescape(subject);
        int error;
        size_t offset;
        pcre2_code *code = pcre2_compile_8((const unsigned char *)fields[1], strlen(fields[1]),
                                           strcmp(fields[0], "~*") == 0 ? CASELESS : 0, &error, &offset, NULL);
        if (!code) { printf("does not compile: %s\n", fields[1]); wrong++; continue; }
        uint32_t groups;
        pcre2_pattern_info_8(code, INFO_CAPTURECOUNT, &groups);
        pcre2_match_data *data = pcre2_match_data_create_from_pattern_8(code, NULL);
        int rc = pcre2_match_8(code, (const unsigned char *)subject, strlen(subject), 0, 0, data, NULL);
        answer[0] = 0;
        if (rc == ERROR_NOMATCH) {
            append(answer, sizeof answer, "no");
        } else if (rc < 0) {
            snprintf(answer, sizeof answer, "error %d (a match limit?)", rc);
        } else {
            size_t *ovector = pcre2_get_ovector_pointer_8(data);
            for (uint32_t g = 0; g <= groups; g++) {
                if (g) append(answer, sizeof answer, " ");
                if (g >= (uint32_t)rc || ovector[2 * g] == (size_t)-1) { append(answer, sizeof answer, "nil"); continue; }
                append(answer, sizeof answer, "[");
                for (size_t k = ovector[2 * g]; k < ovector[2 * g + 1]; k++) {
                    char one[2] = {subject[k], 0};
                    append(answer, sizeof answer, subject[k] == '\n' ? "\\n" : one);
                }
                append(answer, sizeof answer, "]");
            }
        }
        lines++;
        if (strcmp(answer, fields[3]) != 0) {
            wrong++;
            printf("%s%s on \"%s\": expected %s, PCRE2 %s\n", fields[0], fields[1], fields[2], fields[3], answer);
        }
    }
    printf("%ld vectors, %ld differ from PCRE2\n", lines, wrong);
    return wrong ? 1 : 0;
}
