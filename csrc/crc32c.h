/* CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum EMS puts on every
 * block that crosses a network or a disk.
 *
 * Contract: ems_crc32c(0, data, len) is the standard CRC-32C of data (initial value and
 * final XOR 0xFFFFFFFF applied inside), and calls chain like zlib's crc32:
 * ems_crc32c(ems_crc32c(0, a, na), b, nb) == ems_crc32c(0, a || b, na + nb).
 * The SSE4.2 instruction is used where the CPU has it, else an 8-table software loop; both
 * give the same result. Thread-safe. */
#ifndef EMS_CRC32C_H
#define EMS_CRC32C_H

#include <stddef.h>
#include <stdint.h>

uint32_t ems_crc32c(uint32_t crc, const void *data, size_t len);

/* The software loop alone, and whether ems_crc32c uses the CPU instruction (for tests). */
uint32_t ems_crc32c_software(uint32_t crc, const void *data, size_t len);
int ems_crc32c_hardware(void);

#endif
