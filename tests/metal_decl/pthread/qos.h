// Declaration-only stand-in for Apple's <pthread/qos.h> (and the qos_class_t of <sys/qos.h>):
// what csrc/metal uses, as Apple's headers declare it. Linux compile check only; never linked.
#pragma once

#include <pthread.h>

// <sys/qos.h>: __QOS_ENUM(qos_class, unsigned int, ...) expands, in C++ with fixed enums, to an
// anonymous enum plus `typedef unsigned int qos_class_t` (not an enum type).
enum : unsigned int {
  QOS_CLASS_USER_INTERACTIVE = 0x21,
  QOS_CLASS_USER_INITIATED = 0x19,
  QOS_CLASS_DEFAULT = 0x15,
  QOS_CLASS_UTILITY = 0x11,
  QOS_CLASS_BACKGROUND = 0x09,
  QOS_CLASS_UNSPECIFIED = 0x00,
};
typedef unsigned int qos_class_t;

extern "C" {
int pthread_set_qos_class_self_np(qos_class_t __qos_class, int __relative_priority);
int pthread_get_qos_class_np(pthread_t __pthread, qos_class_t* __qos_class,
                             int* __relative_priority);
}
